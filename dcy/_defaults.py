"""Defaults of ``Dcy``'s methods whose machinery loads on first use (``dcy/__init__.py``)."""

# Consul's reaper runs every 30s and refuses DeregisterCriticalServiceAfter under one minute.
MIN_DEREGISTER_AFTER = 60.0
# A leader session: Consul's minimum TTL, and Consul's own default lock-delay.
DEFAULT_TTL = 10.0
DEFAULT_LOCK_DELAY = 15.0
