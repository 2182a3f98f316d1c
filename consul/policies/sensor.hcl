# svc sensor: serves readings (http), pushes them to a worker (--mode push), or publishes
# them to nsqd (--mode nsq).
agent_prefix "" { policy = "read" }     # GET /v1/agent/self at start
service "sensor" { policy = "write" }   # register itself (HTTP and TCP liveness checks), deregister on exit
node_prefix "" { policy = "read" }      # nodes of the peers it resolves (--mode push, nsq)
service "worker" { policy = "read" }    # (--mode push) POST http://worker/push
service "nsqd" { policy = "read" }      # (--mode nsq) the nsqd to publish to
