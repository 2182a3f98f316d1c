# The embedded default agent of `scripts/up`: one dev agent (server + client) on this host.
# Started as `consul agent -dev -config-file consul/dev.hcl -config-dir consul/services`.
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

log_level = "INFO"
