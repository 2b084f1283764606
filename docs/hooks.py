"""mkdocs hook: the package's docstrings name things with Sphinx roles (:func:`edgeattn.load`); on the site those
read as code, without the role."""

import re

ROLE = re.compile(r":(?:class|func|meth|data|mod|attr|obj|exc):(<code>)")


def on_page_content(html, **kwargs):
    return ROLE.sub(r"\1", html)
