"""The services a scaled-out AiiDA profile needs: PostgreSQL (storage) and RabbitMQ (broker).

:mod:`.reachability` finds out whether they answer and what to run when they do not,
:mod:`.postgres` makes the profile's database (with a locale fallback), :mod:`.consumer_timeout`
reads RabbitMQ's ``consumer_timeout``, :mod:`.profile` creates or reuses the ``core.psql_dos``
profile with the RabbitMQ broker, :mod:`.lost_tasks` finds active processes whose task the broker
no longer holds and :mod:`.daemon_processes` finds the daemon's processes in the process table (workers
that a crashed daemon left behind). Only :mod:`.postgres`, :mod:`.profile`, :mod:`.lost_tasks` and
:func:`.daemon_processes.profile_daemon_processes` import :mod:`aiida` (lazily), so the checks can run
before the AiiDA configuration directory is chosen.
"""
