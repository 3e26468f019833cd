"""The head's HTTP service (Ray's port 8265): the dashboard, the jobs' REST API, the
metrics, read from the log. One aiohttp application (``app.make_app``) whose parts each
add their routes (``ROUTE_MODULES``); run by the head (``cairn start --head``) and on
its own by ``cairn dashboard --gcs-url URL``, which needs nothing but the log.

aiohttp: a well-kept asyncio server (and client) library, the same event loop model as
the rest of the control plane, no framework beyond routing; it is what Ray's own
dashboard is built on, so its REST paths map one to one."""
