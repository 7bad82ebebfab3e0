#!/usr/bin/env bash
# A single-node Slurm cluster on this host, reached over SSH as root@localhost: the set-up that
# docs/cluster.md walks through and tests/test_slurm_cluster.py runs against.
#
#   * munge + slurmctld + slurmd (Debian bookworm's slurm-wlm 22.05), node = this host, all its CPUs,
#     partitions `cpu` (default) and `gpu`; the gpu partition's node has one GRES `gpu` backed by
#     /dev/null (no real device: `#SBATCH --gres=gpu:1` is accepted and scheduled, nothing more);
#   * accounting (sacct) through slurmdbd into a MariaDB database `slurm_acct_db`, when MariaDB runs
#     here (SLURM_ACCOUNTING=0 skips it; without it sacct has no data, squeue/scontrol still work);
#   * an OpenSSH server that listens on 127.0.0.1 only, key login for root (~/.ssh/id_ed25519).
#
# Run as root on a Debian/Ubuntu machine without systemd (containers): the daemons are started
# directly. slurmd runs under `nice -n 19`, so the jobs do too (PropagatePrioProcess=0). Idempotent:
# a second run rewrites the configuration and restarts the Slurm daemons. PostgreSQL and RabbitMQ are
# not touched. Nothing here is meant for a shared or production machine.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "run as root" >&2
    exit 1
fi
HOST=$(hostname -s)
CPUS=$(nproc)
CLUSTER=${SLURM_CLUSTER_NAME:-emlip}
ACCOUNTING=${SLURM_ACCOUNTING:-1}

echo "== packages"
need=()
for cmd in sbatch:slurm-wlm slurmctld:slurm-wlm munged:munge sshd:openssh-server; do
    command -v "${cmd%%:*}" >/dev/null || [[ -x /usr/sbin/${cmd%%:*} ]] || need+=("${cmd##*:}")
done
if [[ $ACCOUNTING == 1 && ! -x /usr/sbin/slurmdbd ]]; then
    need+=(slurmdbd)
fi
if ((${#need[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

# memory Slurm may hand out: what slurmd sees, less 1 GiB for the system (MiB); asked once slurmd
# is installed (with set -e, a missing slurmd here would end the script without a word)
MEM=$(($(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1) - 1024))

echo "== munge"
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    service munge start
fi
munge -n | unmunge | grep STATUS

echo "== sshd on 127.0.0.1:22, key login for root"
mkdir -p /run/sshd /root/.ssh
chmod 700 /root/.ssh
cat >/etc/ssh/sshd_config.d/local-only.conf <<EOF
ListenAddress 127.0.0.1
PasswordAuthentication no
PermitRootLogin prohibit-password
EOF
if [[ ! -f /root/.ssh/id_ed25519 ]]; then
    ssh-keygen -q -t ed25519 -N "" -f /root/.ssh/id_ed25519 -C root@localhost
fi
touch /root/.ssh/authorized_keys
chmod 600 /root/.ssh/authorized_keys
grep -qxF "$(cat /root/.ssh/id_ed25519.pub)" /root/.ssh/authorized_keys ||
    cat /root/.ssh/id_ed25519.pub >>/root/.ssh/authorized_keys
if pgrep -x sshd >/dev/null; then service ssh restart; else service ssh start; fi
sleep 1
touch /root/.ssh/known_hosts
ssh-keygen -R localhost >/dev/null 2>&1 || true
ssh-keyscan -t ed25519 localhost 2>/dev/null >>/root/.ssh/known_hosts
ssh -o BatchMode=yes root@localhost true
echo "ssh root@localhost: ok"

echo "== slurm.conf, gres.conf (node $HOST, $CPUS CPUs)"
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /etc/slurm
chown slurm:slurm /var/spool/slurmctld /var/log/slurm
if [[ $ACCOUNTING == 1 ]] && mysql -e 'select 1' >/dev/null 2>&1; then
    ACCOUNTING_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
else
    ACCOUNTING=0
    ACCOUNTING_LINES="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi
cat >/etc/slurm/slurm.conf <<EOF
# single-node test cluster written by .ci/slurm_setup.sh
ClusterName=$CLUSTER
SlurmctldHost=$HOST
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# containers: no cgroups
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=600
MailProg=/bin/true
GresTypes=gpu
$ACCOUNTING_LINES
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$HOST MaxTime=INFINITE State=UP
EOF
cat >/etc/slurm/gres.conf <<EOF
# no real GPU: a GRES gpu backed by /dev/null, so that --gres=gpu:1 is accepted and scheduled
AutoDetect=off
NodeName=$HOST Name=gpu File=/dev/null
EOF

stop_daemon() {
    local pidfile=$1
    if [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        kill "$(cat "$pidfile")"
        for _ in $(seq 20); do kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 0.5; done
    fi
}

if [[ $ACCOUNTING == 1 ]]; then
    echo "== slurmdbd (MariaDB database slurm_acct_db)"
    DBPASS_FILE=/etc/slurm/.slurmdbd_db_password
    [[ -f $DBPASS_FILE ]] || (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$DBPASS_FILE")
    DBPASS=$(cat "$DBPASS_FILE")
    mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
    cat >/etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DBPASS
StorageLoc=slurm_acct_db
EOF
    chown slurm:slurm /etc/slurm/slurmdbd.conf
    chmod 600 /etc/slurm/slurmdbd.conf
    stop_daemon /run/slurmdbd.pid
    /usr/sbin/slurmdbd
    for _ in $(seq 30); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 1; done
fi

echo "== slurmctld, slurmd"
stop_daemon /run/slurmd.pid
stop_daemon /run/slurmctld.pid
/usr/sbin/slurmctld
nice -n 19 /usr/sbin/slurmd
if [[ $ACCOUNTING == 1 ]]; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
    sacctmgr -i add account emlip Cluster="$CLUSTER" >/dev/null 2>&1 || true
    sacctmgr -i add user root Account=emlip >/dev/null 2>&1 || true
fi
for _ in $(seq 30); do
    state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -1)
    [[ $state == idle* || $state == mix* || $state == alloc* ]] && break
    sleep 1
done
scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
sinfo

echo "== smoke test: a 2-task job on cpu, a --gres=gpu:1 job on gpu"
srun -p cpu -n 2 hostname
srun -p gpu --gres=gpu:1 -n 1 bash -c 'echo "gpu job on $(hostname): CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}"'
echo "slurm cluster '$CLUSTER' ready (accounting: $([[ $ACCOUNTING == 1 ]] && echo slurmdbd || echo none))"
