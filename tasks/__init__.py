"""Build and run automation (`inv --list`): the thor script of the original system."""

from invoke import Collection

from tasks import dns, run

namespace = Collection.from_module(run)
namespace.add_task(dns.dns)
