"""
The layout keeps the data path readable: each module of C{ent/} belongs to
one layer, and imports run one way, from the services down to the shared
basics (ARCHITECTURE.md draws it). A new module must be given its layer
here; an import against the direction fails, naming the import.

Also: every file that ARCHITECTURE.md, CONTRIBUTING.md and README.md name
exists.
"""

import ast
import os
import re

from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (layer, the files and folders of ent/ in it, the layers it may use besides
# its own), lowest first. A layer may use only layers listed before it.
LAYERS = (
    (
        "basics",
        ("ent/__init__.py", "ent/errors.py", "ent/cli.py", "ent/flow.py", "ent/eventloop.py", "ent/ratelimit.py"),
        (),
    ),
    ("legs", ("ent/legs/", "ent/ratstls.py"), ("basics",)),
    ("observability", ("ent/observability/",), ("basics", "legs")),
    ("hostconfig", ("ent/hostconfig/",), ("basics",)),
    ("capture", ("ent/capture/", "ent/tun.py"), ("basics", "observability", "hostconfig")),
    ("protocols", ("ent/protocols/",), ("basics", "legs", "observability")),
    (
        "service support",
        ("ent/services/__init__.py", "ent/services/options.py", "ent/services/reload.py", "ent/services/startup.py"),
        ("basics", "legs", "observability", "hostconfig", "capture", "protocols"),
    ),
    (
        "services",
        ("ent/services/agent.py", "ent/services/gateway.py", "ent/services/socketrelay.py"),
        ("basics", "legs", "observability", "hostconfig", "capture", "protocols", "service support"),
    ),
    (
        "wiring",
        ("ent/services/app.py", "ent/__main__.py"),
        ("basics", "legs", "observability", "hostconfig", "capture", "protocols", "service support", "services"),
    ),
    (
        "testing",
        ("ent/testing/",),
        (
            "basics",
            "legs",
            "observability",
            "hostconfig",
            "capture",
            "protocols",
            "service support",
            "services",
            "wiring",
        ),
    ),
)

# No service imports another: only the wiring above them builds them.
NO_IMPORTS_WITHIN = {"services"}


def layerOf(path):
    """
    The layer of C{path} (relative to the repository), by its most specific
    entry in L{LAYERS}; C{None} if it has none.
    """
    best = None
    for name, members, _ in LAYERS:
        for member in members:
            if path == member or member.endswith("/") and path.startswith(member):
                if best is None or len(member) > len(best[1]):
                    best = (name, member)
    return best and best[0]


def moduleFile(dotted, root=ROOT):
    """
    The file of module C{dotted} under C{root}, or C{None} if it is not one
    of ENT's modules.
    """
    base = os.path.join(root, *dotted.split("."))
    for candidate in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(candidate):
            return os.path.relpath(candidate, root)
    return None


def importsOf(path, root=ROOT):
    """
    Yield (line, dotted module) for every import of an C{ent} module in the
    file at C{path}, also those inside functions.
    """
    with open(os.path.join(root, path)) as f:
        tree = ast.parse(f.read(), path)
    package = os.path.dirname(path).replace("/", ".")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                module = ".".join(parts + ([module] if module else []))
            yield node.lineno, module
            for alias in node.names:
                # "from ent.legs import tls" imports ent.legs.tls too.
                if moduleFile(f"{module}.{alias.name}", root):
                    yield node.lineno, f"{module}.{alias.name}"


def entModules(root=ROOT):
    for directory, _, files in os.walk(os.path.join(root, "ent")):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.relpath(os.path.join(directory, name), root)


def violations(root=ROOT):
    """
    One line per import against the layering, and per module without a
    layer.
    """
    allowed = {name: set(uses) for name, _, uses in LAYERS}
    found = []
    for path in sorted(entModules(root)):
        layer = layerOf(path)
        if layer is None:
            found.append(f"{path}: no layer; give it one in tests/test_layout.py LAYERS (see ARCHITECTURE.md)")
            continue
        for line, module in importsOf(path, root):
            if module != "ent" and not module.startswith("ent."):
                continue
            target = moduleFile(module, root)
            if target is None:
                continue
            other = layerOf(target)
            if other == layer and (layer not in NO_IMPORTS_WITHIN or target == path):
                continue
            if other in allowed[layer]:
                continue
            uses = ", ".join(sorted(allowed[layer])) or "nothing else"
            found.append(f"{path}:{line} ({layer}) imports {module} ({other}): {layer} may use {uses}")
    return found


class LayeringTests(unittest.TestCase):
    def test_layersAreOrdered(self):
        """
        A layer uses only layers below it, so no two layers use each other.
        """
        seen = set()
        for name, _, uses in LAYERS:
            self.assertEqual(set(uses) - seen, set(), f"{name} uses a layer listed after it")
            seen.add(name)

    def test_importsRunOneWay(self):
        """
        No module imports a layer above its own, and no service imports
        another; every module of ent/ has a layer.
        """
        found = violations()
        if found:
            self.fail("imports against the layering (see ARCHITECTURE.md):\n" + "\n".join(found))

    def test_checkFindsUpwardImport(self):
        """
        The check fails on a lower layer importing a higher one, naming it.
        """
        tree = self.mktemp()
        for path, text in {
            "ent/__init__.py": "",
            "ent/tun.py": "def f():\n    from ent.services import agent\n",
            "ent/services/__init__.py": "",
            "ent/services/agent.py": "from ent.services.gateway import GatewayService\n",
            "ent/services/gateway.py": "from ent import tun\n",
            "ent/newmodule.py": "",
        }.items():
            os.makedirs(os.path.join(tree, os.path.dirname(path)), exist_ok=True)
            with open(os.path.join(tree, path), "w") as f:
                f.write(text)
        self.assertEqual(
            violations(tree),
            [
                "ent/newmodule.py: no layer; give it one in tests/test_layout.py LAYERS (see ARCHITECTURE.md)",
                "ent/services/agent.py:1 (services) imports ent.services.gateway (services): services may use "
                "basics, capture, hostconfig, legs, observability, protocols, service support",
                "ent/tun.py:2 (capture) imports ent.services (service support): capture may use "
                "basics, hostconfig, observability",
                "ent/tun.py:2 (capture) imports ent.services.agent (services): capture may use "
                "basics, hostconfig, observability",
            ],
        )


# A relative path in a document that starts with one of the repository's
# folders, e.g. `ent/tun.py` or `bench/run.py`.
_PATH = re.compile(r"(?<![\w./-])((?:ent|bench|tests|examples|scripts|twisted|\.ci)/[\w./-]*[\w/])")


class DocumentedPathTests(unittest.TestCase):
    def assertPathsExist(self, document):
        with open(os.path.join(ROOT, document)) as f:
            text = f.read()
        named = sorted(set(_PATH.findall(text)))
        self.assertNotEqual(named, [])
        missing = [path for path in named if not os.path.exists(os.path.join(ROOT, path))]
        self.assertEqual(missing, [], f"{document} names files that do not exist")

    def test_architecture(self):
        self.assertPathsExist("ARCHITECTURE.md")

    def test_contributing(self):
        self.assertPathsExist("CONTRIBUTING.md")

    def test_readme(self):
        self.assertPathsExist("README.md")
