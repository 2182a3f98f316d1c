# svc app: the orchestrator; only the leader (lock dcy/leader/app) works.
agent_prefix "" { policy = "read" }          # GET /v1/agent/self at start
service "app" { policy = "write" }           # register itself (HTTP and TCP liveness checks), deregister on exit
node_prefix "" { policy = "read" }           # nodes of the peers it resolves
session_prefix "" { policy = "write" }       # PUT /v1/session/create (on its own node), renew, destroy; GET /v1/session/info
key "dcy/leader/app" { policy = "write" }    # the lock: GET (blocking) and PUT ?acquire= / ?release= /v1/kv/dcy/leader/app
service "sensor" { policy = "read" }         # GET http://sensor/ each cycle
service "worker" { policy = "read" }         # POST http://worker/ each cycle
service "nsqd" { policy = "read" }           # (--mode nsq) create topic/channel worker_result/app
service "nsqlookupd" { policy = "read" }     # (--mode nsq) where the consumer finds producers of worker_result
