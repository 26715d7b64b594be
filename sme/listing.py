"""What ``analyze.py --list`` prints: each analysis, its one-line doc, its settings with defaults.

An analysis's settings are the keys of its ``*_DEFAULTS`` dict (`SETTINGS` says which dict in
which module); the text after each key's ``#`` comment in that module's source (its meaning
and range) is shown beside the default.
"""

from __future__ import annotations

import importlib
import inspect
import re

# analysis name -> (module under sme.analyses, name of its defaults dict)
SETTINGS = {
    "hessian": ("curvature", "HESSIAN_DEFAULTS"),
    "hessian_modified": ("curvature", "HESSIAN_MODIFIED_DEFAULTS"),
    "hessian_density": ("curvature", "DENSITY_DEFAULTS"),
    "fisher": ("curvature", "FISHER_DEFAULTS"),
    "covariance": ("noise", "COVARIANCE_DEFAULTS"),
    "alignment": ("noise", "ALIGNMENT_DEFAULTS"),
    "flatness": ("landscape", "FLATNESS_DEFAULTS"),
    "trajectory_flatness": ("landscape", "TRAJECTORY_DEFAULTS"),
    "profile": ("landscape", "PROFILE_DEFAULTS"),
    "weak_error": ("weak_error", "DEFAULTS"),
}


def _region(source: str, attr: str) -> str:
    """The source text of ``attr = dict(...)`` (balanced parentheses), or '' when not found."""
    match = re.search(rf"^{re.escape(attr)}\s*=\s*dict\(", source, re.MULTILINE)
    if not match:
        return ""
    depth, i = 1, match.end()
    while depth and i < len(source):
        depth += {"(": 1, ")": -1}.get(source[i], 0)
        i += 1
    return source[match.start():i]


def _comment(source: str, attr: str, key: str, seen=()) -> str:
    """The ``# comment`` of `key` in dict `attr`, else in the dicts it extends (``dict(BASE, ...)``)."""
    region = _region(source, attr)
    match = re.search(rf"^\s+{re.escape(key)}=.*?#\s*(.+)$", region, re.MULTILINE)
    if match:
        return match.group(1).strip()
    for base in re.findall(r"\b([A-Z_]*DEFAULTS)\b", region):
        if base != attr and base not in seen:
            found = _comment(source, base, key, (*seen, attr))
            if found:
                return found
    return ""


def settings(name: str) -> list[tuple[str, object, str]]:
    """``[(setting, default, comment), ...]`` of analysis `name`; [] when it has none listed."""
    if name not in SETTINGS:
        return []
    module_name, attr = SETTINGS[name]
    module = importlib.import_module(f"sme.analyses.{module_name}")
    source = inspect.getsource(module)
    return [(key, value, _comment(source, attr, key)) for key, value in getattr(module, attr).items()]


def describe(registry: dict) -> str:
    """The --list text for a registry of analyses (`sme.analyses.load_all()`)."""
    lines = []
    for name, analysis in sorted(registry.items()):
        lines.append(f"{name}: {analysis.doc.splitlines()[0] if analysis.doc else ''}")
        for key, value, comment in settings(name):
            default = f"{name}.{key}={value!r}"
            lines.append(f"    {default:<44} {comment}".rstrip())
    lines.append("Set any of them with --set NAME.FIELD=VALUE (a Python literal), e.g. --set hessian.top_k=20.")
    return "\n".join(lines)
