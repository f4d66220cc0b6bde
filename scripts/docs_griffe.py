"""A griffe extension for the API reference (mkdocs.yml): the docstrings' Sphinx roles
(``:class:`~cggm.x.Y```, ``:meth:`fit```) become code spans of the short name, since the Google-style
parser leaves them as raw text."""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|obj|exc):`~?([^`]+)`")


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(lambda m: f"`{m.group(1).split('.')[-1]}`", obj.docstring.value)
