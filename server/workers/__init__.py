"""Several worker processes on one host (``ferry serve --workers N``): the supervisor
(:mod:`~ferry.server.workers.supervisor`), a worker's link to it and the RPCs every worker answers together
(:mod:`~ferry.server.workers.worker`), the link itself (:mod:`~ferry.server.workers.channel`) and how the workers'
statistics and metrics add up (:mod:`~ferry.server.workers.merge`).

With one worker (the default) none of this runs: ``ferry serve`` is the server itself.
"""
