"""dcy.template: a consul-template clone on jinja2's sandbox, driven by dcy's watch engine.

Use the ``dcy-template`` console script (``dcy.template.cli``), or embed a :class:`Renderer`
next to a service so both share one watch per query.
"""

from dcy.template._commands import CommandResult
from dcy.template._functions import TemplateError
from dcy.template._runner import Renderer, RendererOptions
from dcy.template._spec import TemplateSpec, parse_template_flag
from dcy.template._write import render_atomically

__all__ = [
    "CommandResult",
    "Renderer",
    "RendererOptions",
    "TemplateError",
    "TemplateSpec",
    "parse_template_flag",
    "render_atomically",
]
