"""Build and run automation (`inv --list`): the thor script of the original system."""

from invoke.collection import Collection

from tasks import containers, dns, infra, run

namespace = Collection.from_module(run)
namespace.add_task(dns.dns)
namespace.add_task(containers.images)
namespace.add_task(containers.deploy)
namespace.add_collection(Collection.from_module(infra))
