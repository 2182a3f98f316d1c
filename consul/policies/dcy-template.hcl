# dcy-template: reads what templates read. ${service_prefix} covers the services templates
# ask for (service(), services()), ${key_prefix} the keys (key(), keyOrDefault(), ls(), tree()).
# Both may be "" (everything), at the price of least privilege.
agent_prefix "" { policy = "read" }                  # GET /v1/agent/self at start: datacenter, node, DNS domain
service_prefix "${service_prefix}" { policy = "read" } # GET /v1/health/service/<name>, /v1/catalog/services
node_prefix "" { policy = "read" }                   # instances' nodes; node(), nodes(): /v1/catalog/node(s)
key_prefix "${key_prefix}" { policy = "read" }       # GET /v1/kv/<key> (and ?recurse for ls/tree)
