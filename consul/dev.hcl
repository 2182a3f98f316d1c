# The embedded default agent of `scripts/up`: one dev agent (server + client) on this host.
# Started as `consul agent -dev -config-file consul/dev.hcl` (see the Procfile). NSQ's daemons
# are registered by `dcy-register`, which runs each of them, not by service files here.
datacenter = "dev"
domain     = "sd"
node_name  = "dev"
data_dir   = ".data/consul"

# Loopback only: the dev system is for this machine, nothing else should reach it.
bind_addr   = "127.0.0.1"
client_addr = "127.0.0.1"

ui_config {
  enabled = true
}

ports {
  http = 8500
  dns  = 8600
}

# DNS (`dig @127.0.0.1 -p 8600 nsqd.service.sd`, or any program once `inv dns` pointed the
# host's resolver at dnsmasq). The trade-off is freshness against the cost of a lookup:
# - service_ttl / node_ttl above 0 let dnsmasq (and any caching client) keep an answer, so
#   most lookups never reach the agent; but an instance whose check just failed stays in
#   cached answers for up to that TTL, after the check interval it took Consul to notice.
#   Consul's default of 0 caches nothing: always fresh, every lookup is a round trip to the
#   agent. Here 5s on top of 5s check intervals: a dead instance leaves DNS within ~10s.
#   Negative answers (no instance) are not cached (soa.min_ttl stays 0), so an instance
#   that comes back is resolvable at once.
# - allow_stale lets any server answer, not only the leader: answers may lag the leader by
#   up to max_stale, but DNS keeps answering during an election or without a leader. With
#   one dev server nothing lags; it is the setting every other datacenter should copy.
# - only_passing: a DNS client cannot see check states, so it gets only instances fit to
#   serve; by default Consul hides critical instances but still hands out warning ones.
dns_config {
  allow_stale  = true
  max_stale    = "87600h"
  node_ttl     = "5s"
  service_ttl  = { "*" = "5s" }
  only_passing = true
}

log_level = "INFO"
