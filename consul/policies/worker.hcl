# svc worker: squares readings it is sent (http), pushes results to the app (--mode push), or
# consumes and publishes through NSQ (--mode nsq).
agent_prefix "" { policy = "read" }       # GET /v1/agent/self at start
service "worker" { policy = "write" }     # register itself (HTTP and TCP liveness checks), deregister on exit
node_prefix "" { policy = "read" }        # nodes of the peers it resolves (--mode push, nsq)
service "app" { policy = "read" }         # (--mode push) POST http://app/result
service "nsqd" { policy = "read" }        # (--mode nsq) create topic/channel on every nsqd, publish results
service "nsqlookupd" { policy = "read" }  # (--mode nsq) where the consumer finds producers of sensor_values
