#!/usr/bin/env bash
# Every GPU table of bench/ in parts, each step under its own time limit so that one slow or failing
# step leaves the others' figures. Part 1 (~6 min on an H200): head times / sr with the tiny backbone
# (1k-16k atoms, then 64k; qeq beside qeq+graphs, its CG iterations replayed as CUDA graphs) and the
# realistic one (4k-16k), and the heads' training steps on small molecules in large boxes (the batched
# Ewald sums, ~1.5 min more). Part 2 (~8 min): training throughput against mace_run_train, every head's
# training steps against sr's in one process, the backbone's GPU options (TF32, cuEquivariance), MD steps
# per second (e3nn, then cuEquivariance kernels) and the CUDA tests. Part "graphs" (~5 min): the CUDA
# graph replay of qeq's CG alone (its CUDA test, head times and MD steps beside the eager qeq). Part
# "compile": torch.compile of the backbone. Each Python process spends ~20 s starting (imports,
# TorchScript of e3nn).
#
#   bash bench/gpu_suite.sh OUTDIR [1|2|all|graphs|compile]   (needs a CUDA device; aiida-emlip importable, no AiiDA)
#
# Each step writes OUTDIR/<step>.log (and .json where the script has one); OUTDIR/summary.txt lists
# each step's exit status and seconds (124: stopped at its limit, its JSON keeps what was measured).
set -u
out=${1:?usage: gpu_suite.sh OUTDIR [1|2|all|graphs|compile]}
part=${2:-all}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  timeout --kill-after=5 "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc ${limit}s-limit $((SECONDS - t0))s" | tee -a "$out/summary.txt"
}

"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" \
  | tee -a "$out/summary.txt" || exit 1
if [ "$part" = 1 ] || [ "$part" = all ]; then
  step heads_tiny "${LIMIT_HEADS:-170}" "$py" bench/bench_heads.py --device cuda --sizes 1k,4k,16k \
    --heads sr,fixed,charges,latent,split,qeq,qeq+graphs,scf,scf-newton,functional --json "$out/heads_tiny.json"
  step heads_64k "${LIMIT_64K:-90}" "$py" bench/bench_heads.py --device cuda --sizes 64k \
    --heads sr,charges,split,qeq,scf --json "$out/heads_64k.json"
  step heads_realistic "${LIMIT_REALISTIC:-90}" "$py" bench/bench_heads.py --device cuda --sizes 4k,16k \
    --backbone realistic --heads sr,charges,qeq,qeq+graphs,scf --json "$out/heads_realistic.json"
  step train_steps_cells "${LIMIT_TRAIN_CELLS:-90}" "$py" bench/bench_train_step.py --device cuda \
    --dtype float32 --data long-range --batch-size 4 --induction --heads charges,latent,qeq,scf --rounds 4
fi
if [ "$part" = 2 ] || [ "$part" = all ]; then
  step training "${LIMIT_TRAINING:-200}" "$py" bench/bench_training.py --device cuda --dtype float32 \
    --repeat 1 --heads sr,charges,qeq,scf --json "$out/training.json"
  step train_steps "${LIMIT_TRAIN_STEPS:-90}" "$py" bench/bench_train_step.py --device cuda --dtype float32 \
    --heads charges,split,split@last,qeq,scf,functional-bonds --rounds 5
  step backbone_options "${LIMIT_OPTIONS:-80}" "$py" bench/bench_gpu_backbone.py --variants fp32,tf32,cueq \
    --systems water --json "$out/backbone_options.json"
  step md "${LIMIT_MD:-90}" "$py" bench/bench_evaluate.py --device cuda --skip-overhead --sizes 1000,5000 \
    --backbones tiny,realistic --heads sr,charges,qeq,qeq+graphs,scf --steps 3 --rounds 2 --json "$out/md.json"
  step md_cueq "${LIMIT_MD_CUEQ:-60}" "$py" bench/bench_evaluate.py --device cuda --skip-overhead \
    --sizes 1000,5000 --backbones realistic --kernels cueq --steps 3 --rounds 2 --json "$out/md_cueq.json"
  step cuda_tests "${LIMIT_TESTS:-60}" "$py" -m pytest --noconftest -p no:cacheprovider -q -m cuda \
    tests/test_model_io.py tests/test_electrostatics.py tests/test_neighbours.py tests/test_solver_replay.py
fi
if [ "$part" = graphs ]; then  # qeq's CG iterations replayed as CUDA graphs: the test, then side by side
  step graphs_tests "${LIMIT_GRAPHS_TESTS:-90}" "$py" -m pytest --noconftest -p no:cacheprovider -q -m cuda \
    tests/test_solver_replay.py
  step graphs_heads "${LIMIT_GRAPHS_HEADS:-150}" "$py" bench/bench_heads.py --device cuda --sizes 1k,4k,16k \
    --heads sr,qeq,qeq+graphs --rounds 2 --json "$out/graphs_heads.json"
  step graphs_md "${LIMIT_GRAPHS_MD:-90}" "$py" bench/bench_evaluate.py --device cuda --skip-overhead \
    --sizes 1000,5000 --backbones tiny --heads sr,qeq,qeq+graphs --steps 3 --rounds 2 --json "$out/graphs_md.json"
fi
if [ "$part" = compile ]; then  # torch.compile of the backbone: its first call did not finish in 35 s
  step compile "${LIMIT_COMPILE:-300}" "$py" bench/bench_gpu_backbone.py --variants fp32,compile --sizes 4k \
    --systems water --heads sr --json "$out/compile.json"
fi
