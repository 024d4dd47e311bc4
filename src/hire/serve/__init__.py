"""The OpenAI-compatible server over the engine: the ASGI app (``app``), the continuous-batching
decode loop (``scheduler``), text in and out (``text``), the request bodies (``protocol``)."""

from hire.serve.app import Service, create_app
from hire.serve.scheduler import Sampling, Scheduler, SchedulerStopped, Sequence
from hire.serve.service import UnsupportedForServing, load_service, serve

__all__ = ["Sampling", "Scheduler", "SchedulerStopped", "Sequence", "Service", "UnsupportedForServing",
           "create_app", "load_service", "serve"]
