# dcy-alert: health transitions of the services under ${service_prefix} ("" for every one,
# as plain `dcy-alert` watches; a name for `--service NAME`).
agent_prefix "" { policy = "read" }                    # GET /v1/agent/self: datacenter, node
service_prefix "${service_prefix}" { policy = "read" } # GET /v1/health/state/any or /v1/health/service/<name>: service checks
node_prefix "" { policy = "read" }                     # the nodes of those checks (and node checks such as serfHealth)
