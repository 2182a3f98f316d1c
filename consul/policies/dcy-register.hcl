# dcy-register: registers ${service} (one service rule per service of a --config file).
agent_prefix "" { policy = "read" }        # GET /v1/agent/self: node name, address for the registration
service "${service}" { policy = "write" }  # PUT /v1/agent/service/register, deregister, check/update (--check-cmd, ttl); GET /v1/agent/service/<id>
