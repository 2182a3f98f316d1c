"""Known ways out of jinja2's sandbox, as templates: each must be refused by dcy-template or
render harmless text. Shared by the in-process test (tests/unit/test_template_sandbox.py)
and the one through the real CLI against a real agent (tests/integration/
test_template_security.py). Templates reach a record through ``service('consul')``: the
Consul servers register that service themselves."""

from __future__ import annotations

from dataclasses import dataclass

# What the renderer's CONSUL_HTTP_TOKEN is set to while the corpus renders: no output may
# ever contain it.
CANARY_TOKEN = "5ec2e7-canary-token-9d1f"

_FIRST = "{% for s in service('consul') %}"


@dataclass(frozen=True)
class Escape:
    name: str
    source: str
    refused: str | None = None  # a refusal's message contains this
    renders: str | None = None  # or the output starts with this


ESCAPES: tuple[Escape, ...] = (
    # class / mro / subclasses
    Escape("str-mro-subclasses", "{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
    Escape("tuple-base", "{{ ().__class__.__base__.__subclasses__() }}", "unsafe"),
    Escape("type-mro-method", "{{ dict.mro() }}", "unsafe"),
    Escape("record-class", _FIRST + "{{ s.__class__ }}{% endfor %}", "unsafe"),
    Escape("record-fields", _FIRST + "{{ s.__dataclass_fields__ }}{% endfor %}", "unsafe"),
    Escape("record-field-mro", _FIRST + "{{ s.Node.__class__.__mro__ }}{% endfor %}", "unsafe"),
    Escape("record-meta-class", _FIRST + "{{ s.ServiceMeta.__class__ }}{% endfor %}", "unsafe"),
    Escape("record-tags-class", _FIRST + "{{ s.Tags.__class__ }}{% endfor %}", "unsafe"),
    # __globals__ through functions
    Escape("function-globals", "{{ service.__globals__ }}", "unsafe"),
    Escape("bound-self", "{{ service.__self__ }}", "unsafe"),
    Escape("bound-func-globals", "{{ service.__func__.__globals__ }}", "unsafe"),
    Escape("env-policy", "{{ env.__self__._env_policy }}", "unsafe"),
    Escape("helper-globals", "{{ toLower.__globals__ }}", "unsafe"),
    Escape("helper-code", "{{ toLower.__code__ }}", "unsafe"),
    Escape("range-globals", "{{ range.__globals__ }}", "unsafe"),
    Escape("set-then-self", "{% set f = service %}{{ f.__self__ }}", "unsafe"),
    # cycler / lipsum / joiner / namespace
    Escape("cycler-globals", "{{ cycler.__init__.__globals__.os.environ }}", "unsafe"),
    Escape("cycler-instance", "{{ cycler(1, 2).__class__ }}", "unsafe"),
    Escape("joiner-globals", "{{ joiner.__init__.__globals__ }}", "unsafe"),
    Escape("namespace-globals", "{{ namespace.__init__.__globals__ }}", "unsafe"),
    Escape("namespace-attrs", "{{ namespace(a=1)._Namespace__attrs }}", "unsafe"),
    Escape("lipsum-globals", "{{ lipsum.__globals__['os'].environ }}", "'lipsum' is undefined"),
    # the template reference
    Escape("template-context", "{{ self._TemplateReference__context }}", "unsafe"),
    Escape(
        "template-environment",
        "{{ self._TemplateReference__context.environment.globals }}",
        "unsafe",
    ),
    # attr filter chains and attribute= arguments
    Escape("attr-chain", "{{ ''|attr('__class__')|attr('__mro__') }}", "has no attribute"),
    Escape("attr-globals", "{{ service|attr('__globals__') }}", "unsafe"),
    Escape("attr-record", _FIRST + "{{ s|attr('__class__') }}{% endfor %}", "unsafe"),
    Escape("map-attribute", "{{ [service]|map(attribute='__globals__')|list }}", renders="["),
    Escape("sort-attribute", "{{ [1, 2]|sort(attribute='__class__')|list }}", "unsafe"),
    # str.format field access
    Escape("format-class", "{{ '{0.__class__}'.format(1) }}", "unsafe"),
    Escape("format-globals", "{{ '{0.__globals__}'.format(service) }}", "unsafe"),
    Escape("format-map", "{{ '{x.__class__}'.format_map({'x': 1}) }}", "unsafe"),
    Escape("format-markup", "{{ ('{0.__class__}'|safe).format(1) }}", "unsafe"),
    Escape("format-record", _FIRST + "{{ '{0.__class__}'.format(s) }}{% endfor %}", "unsafe"),
    # generators
    Escape("generator-frame", "{{ ([1]|map('string')).gi_frame.f_globals }}", "unsafe"),
    # resources: one expression must not take the renderer down
    Escape("huge-range", "{{ range(10**9)|length }}", "Range too big"),
    Escape("huge-power", "{{ 10 ** (10 ** 9) }}", "too big"),
    Escape("huge-repeat", "{{ 'x' * 10**10 }}", "repeating"),
    Escape("recursion", "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}", "recursion"),
    # other ways to the file system or the token
    Escape("include", "{% include '/etc/passwd' %}", "no loader"),
    Escape("import", "{% from '/etc/passwd' import x %}{{ x }}", "no loader"),
    Escape("file-without-sandbox", "{{ file('/etc/passwd') }}", "file() is disabled"),
    Escape("env-token", "{{ env('CONSUL_HTTP_TOKEN') }}", "CONSUL_*TOKEN*"),
    # harmless text: what the sandbox does allow
    Escape("self", "{{ self }}", renders="<TemplateReference "),
    Escape("pprint-function", "{{ service|pprint }}", renders="<bound method DataFunctions."),
    Escape("namespace-use", "{% set n = namespace(a=1) %}{{ n.a }}", renders="1"),
    Escape("record-field", _FIRST + "{{ s.Name }}{% endfor %}", renders="consul"),
)
