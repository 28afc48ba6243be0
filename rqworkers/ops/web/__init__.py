"""The status page: queues, workers and dead letters of every node, in a browser.

Served by the keeper next to `/metrics` and `/healthz` when `[manager] metrics_address` is
set (see `site.Site`); the page itself is three static files in `static/`, with no build
step and nothing fetched from elsewhere. Requeue and purge need `dashboard_token` (`auth`).
"""

from rqworkers.ops.web.site import Site

__all__ = ["Site"]
