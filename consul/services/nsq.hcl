# NSQ daemons cannot register themselves, so the agent registers them from here.
# Each check says in its notes what it proves, because Consul's UI is the health dashboard.
# Only HTTP /ping checks: nsqd answers 500 to /ping when it is unhealthy (e.g. its disk queue
# fails), which a TCP connect cannot see, and both daemons log every bare TCP probe as a
# protocol error.

services = [
  {
    name = "nsqlookupd"
    id   = "nsqlookupd"
    # Consumers talk to nsqlookupd over HTTP, so that is the port the service announces;
    # nsqd registers itself over TCP on the port in meta.tcp_port.
    port = 4161
    tags = ["http"]
    meta = { tcp_port = "4160" }
    checks = [
      {
        id       = "nsqlookupd-http-ping"
        name     = "nsqlookupd HTTP /ping"
        notes    = "GET /ping on the HTTP API that consumers query for producers of a topic"
        http     = "http://127.0.0.1:4161/ping"
        interval = "5s"
        timeout  = "2s"
      },
    ]
  },
  {
    name = "nsqd"
    id   = "nsqd"
    # Consumers and TCP publishers use 4150; HTTP publishers use meta.http_port.
    port = 4150
    tags = ["tcp"]
    meta = { http_port = "4151" }
    checks = [
      {
        id       = "nsqd-http-ping"
        name     = "nsqd HTTP /ping"
        notes    = "GET /ping: 200 means nsqd is healthy and accepts /pub"
        http     = "http://127.0.0.1:4151/ping"
        interval = "5s"
        timeout  = "2s"
      },
    ]
  },
  {
    name = "nsqadmin"
    id   = "nsqadmin"
    port = 4171
    tags = ["http", "ui"]
    checks = [
      {
        id       = "nsqadmin-http-ping"
        name     = "nsqadmin HTTP /ping"
        notes    = "GET /ping on the web UI"
        http     = "http://127.0.0.1:4171/ping"
        interval = "5s"
        timeout  = "2s"
      },
    ]
  },
]
