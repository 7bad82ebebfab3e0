"""`launch --daemon`: the daemon's workers cache as the profile says, and the command says so."""

from __future__ import annotations

import contextlib


def test_launch_daemon_says_when_the_profile_caches_otherwise():
    """Daemon workers cache as the profile says: `launch --daemon` notes where that differs from --cache."""
    from aiida.manage.caching import disable_caching, enable_caching

    from aiida_emlip.cache_version import CACHED_PROCESSES
    from aiida_emlip.cli.study import daemon_caching_note

    with disable_caching():
        note = daemon_caching_note(True, "p")
        assert note is not None and "leaves caching off for quantumespresso.pw" in note
        assert "verdi -p p config set caching.enabled_for" in note and "daemon restart" in note
        assert daemon_caching_note(False, "p") is None
    with enable_caching(identifier="aiida.calculations:quantumespresso.pw"):
        note = daemon_caching_note(False, "p")
        assert note is not None and "--no-cache does not reach the daemon" in note
        assert "caches quantumespresso.pw;" in note and "config unset caching.enabled_for" in note
    with contextlib.ExitStack() as stack:
        for identifier in CACHED_PROCESSES:
            stack.enter_context(enable_caching(identifier=identifier))
        assert daemon_caching_note(True, "p") is None
