# A service using the dcy library: registers itself as ${service}, resolves ${peer}
# (repeat the peer rule for each service it calls).
agent_prefix "" { policy = "read" }        # GET /v1/agent/self when the client opens: datacenter, node, DNS domain
service "${service}" { policy = "write" }  # PUT /v1/agent/service/register, deregister, check/update (TTL); GET /v1/agent/service/<id> (kept registered)
service "${peer}" { policy = "read" }      # GET /v1/health/service/${peer}: pick, instances, http_client, subscribe
node_prefix "" { policy = "read" }         # the nodes the peer's instances run on (Consul hides instances on nodes the token may not read)
