"""Pipeline files and graphs: the seed's format, the checks, the drawings, the CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mds
from mds.__main__ import main

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "examples" / "pipeline_seed" / "pipeline.yaml"

HANDLERS = """
import mds

class Double(mds.ModelHandler[float, float]):
    def infer(self, batch):
        return [x * 2 for x in batch]
"""


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with handler modules in it, as a user's project has."""
    package = tmp_path / f"handlers_{tmp_path.name}"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "double.py").write_text(HANDLERS)
    (package / "named.py").write_text(HANDLERS + "\nhandler = Double\n")
    (package / "two.py").write_text(HANDLERS + "\nclass Triple(Double):\n    pass\n")
    (package / "none.py").write_text("x = 1\n")
    (package / "broken.py").write_text("import not_a_module_anywhere\n")
    (package / "funcs.py").write_text("def plus_one(x):\n    return x + 1\n\nvalue = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def write(folder: Path, text: str) -> Path:
    path = folder / "pipeline.yaml"
    path.write_text(textwrap.dedent(text).replace("PKG", f"handlers_{folder.name}"))
    return path


def test_the_seeds_document_loads_unchanged() -> None:
    pytest.importorskip("torch")  # the seed's example handlers use torch
    with pytest.warns(UserWarning, match=r"node 'm2' \(pipeline.nodes\[1\]\) cannot be reached"):
        pipeline = mds.Pipeline.load(SEED)
    assert pipeline.name == "test_pipeline"
    assert pipeline.start == "m1"
    assert [n.name for n in pipeline.nodes.values()] == ["m1", "m2", "m3"]
    assert pipeline.nodes["m1"].next == "m3"  # explicit
    assert pipeline.nodes["m2"].next == "m3"  # omitted: the next listed node
    assert pipeline.nodes["m3"].next is None  # the last node ends it
    assert all(n.kind == "model" for n in pipeline.nodes.values())
    assert pipeline.reachable() == {"m1", "m3"}


def test_a_bare_module_gives_its_handler_attribute_or_its_one_handler_class(folder: Path) -> None:
    path = write(
        folder,
        """
        pipeline:
          name: p
          nodes:
          - name: a
            model_load_meta: {handler_module: PKG.double}
          - name: b
            model_load_meta: {handler_module: PKG.named}
          - name: c
            model_load_meta: {handler_module: "PKG.two:Triple", version: "7"}
          - name: d
            function: PKG.funcs:plus_one
            next: null
        """,
    )
    pipeline = mds.Pipeline.load(path)
    nodes = pipeline.nodes
    assert [nodes[n].handler.__name__ for n in "abc"] == ["Double", "Double", "Triple"]  # type: ignore[union-attr]
    assert nodes["c"].version == "7"
    assert nodes["d"].kind == "function" and nodes["d"].next is None
    assert pipeline.start == "a"


@pytest.mark.parametrize(
    ("node", "message"),
    [
        (
            "model_load_meta: {handler_module: PKG.two}",
            r"defines 2 handlers; name one: .*two:Double",
        ),
        ("model_load_meta: {handler_module: PKG.none}", r"module '.*none' has no handler"),
        (
            "model_load_meta: {handler_module: PKG.broken}",
            r"importing module '.*broken' failed: ModuleNotFoundError: No module named "
            r"'not_a_module_anywhere'",
        ),
        ("model_load_meta: {handler_module: PKG.missing}", r"importing module '.*missing' failed"),
        ("function: PKG.funcs:nothing", r"has no 'nothing'"),
        ("function: PKG.funcs:value", r"is a int, not a callable function"),
        ("function: PKG.funcs:plus_one, model: x", r"exactly one of .* \(it has model, function\)"),
        ("next: a", r"exactly one of .* \(it has none\)"),
    ],
)
def test_a_bad_node_is_named_with_its_file_and_path(folder: Path, node: str, message: str) -> None:
    lines = [
        "pipeline:",
        "  name: p",
        "  nodes:",
        "  - name: first",
        "    function: PKG.funcs:plus_one",
    ]
    lines += ["  - name: bad"] + [f"    {line}" for line in node.split(", ")]
    path = write(folder, "\n".join(lines) + "\n")
    with pytest.raises(mds.ConfigError, match=message) as caught:
        mds.Pipeline.load(path)
    assert str(caught.value).startswith(f"{path}: pipeline 'p':\n")
    assert "node 'bad' (pipeline.nodes[1])" in str(caught.value)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "- {name: a, function: 'PKG.funcs:plus_one', next: bb}\n"
            "- {name: b, function: 'PKG.funcs:plus_one'}",
            r"node 'a' \(pipeline.nodes\[0\]\): next 'bb' is not a node of this pipeline "
            r"\(did you mean 'b'\?\); its nodes: a, b",
        ),
        (
            "- {name: a, function: 'PKG.funcs:plus_one', next: b}\n"
            "- {name: b, function: 'PKG.funcs:plus_one', next: a}",
            r"node 'b' \(pipeline.nodes\[1\]\): leads back to 'a', a cycle: a -> b -> a",
        ),
        (
            "- {name: a, function: 'PKG.funcs:plus_one'}\n"
            "- {name: a, function: 'PKG.funcs:plus_one'}",
            r"node 'a' \(pipeline.nodes\[1\]\): the name is already used",
        ),
        (
            "- {name: a, function: 'PKG.funcs:plus_one', color: red}",
            r"node 'a': Object contains unknown field `color` - at `\$.pipeline.nodes\[0\]`",
        ),
        (
            "- {name: a, model_load_meta: {handler_module: PKG.double, "
            "config: {batching: {max_batch_size: big}}}}",
            r"node 'a': Expected `int`, got `str` - at "
            r"`\$.pipeline.nodes\[0\].model_load_meta.config.batching.max_batch_size`",
        ),
        (
            "- {name: r, router: {by: request.kind, routes: {x: nowhere}}}",
            r"node 'r' \(pipeline.nodes\[0\]\): route 'x' -> 'nowhere' is not a node",
        ),
        (
            "- {name: f, fan_out: {nodes: [a, r]}}\n- {name: a, function: 'PKG.funcs:plus_one'}\n"
            "- {name: r, router: {by: input, routes: {x: a}}}",
            r"branch 'r' is a router node; branches must be model or function nodes",
        ),
        (
            "- {name: 'bad name', function: 'PKG.funcs:plus_one'}",
            r"node name 'bad name' is not allowed",
        ),
    ],
)
def test_graph_problems_name_the_file_the_node_and_the_problem(
    folder: Path, body: str, message: str
) -> None:
    text = "pipeline:\n  name: p\n  nodes:\n" + textwrap.indent(body, "  ")
    path = write(folder, text)
    with pytest.raises(mds.ConfigError, match=message) as caught:
        mds.Pipeline.load(path)
    assert str(caught.value).startswith(str(path))


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(mds.ConfigError) as caught:
        mds.Pipeline(
            "p",
            [
                mds.Node.function("a", abs, next="x"),
                mds.Node.function("b", abs, next="y"),
                mds.Node.router("r", "input.kind", {"k": "z"}),
            ],
            start="nope",
        )
    lines = str(caught.value).splitlines()
    assert lines[0] == "pipeline 'p':"
    assert len(lines) == 5  # the start node, and three unknown targets
    assert "the start node 'nope' is not a node" in lines[1]


def test_a_file_that_is_not_a_pipeline_says_what_is_wrong(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(mds.ConfigError, match=r"missing.yaml: cannot read the pipeline file"):
        mds.Pipeline.load(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline: [unclosed\n")
    with pytest.raises(mds.ConfigError, match=r"bad.yaml: not valid YAML"):
        mds.Pipeline.load(bad)
    bad.write_text("- just a list\n")
    with pytest.raises(mds.ConfigError, match=r"a mapping with a 'pipeline' key, not list"):
        mds.Pipeline.load(bad)
    bad.write_text("pipeline: {name: p}\n")
    with pytest.raises(mds.ConfigError, match=r"missing required field `nodes` - at `\$.pipeline`"):
        mds.Pipeline.load(bad)


def test_the_same_graph_from_a_dict_and_from_python(folder: Path) -> None:
    package = f"handlers_{folder.name}"
    document = {
        "pipeline": {
            "name": "p",
            "nodes": [
                {"name": "a", "model_load_meta": {"handler_module": f"{package}.double"}},
                {"name": "b", "function": f"{package}.funcs:plus_one"},
            ],
        }
    }
    from_dict = mds.Pipeline.from_dict(document)
    assert from_dict.nodes["a"].next == "b"
    with pytest.raises(mds.ConfigError, match=r"<dict>: pipeline 'p'"):
        mds.Pipeline.from_dict({"pipeline": {"name": "p", "nodes": [{"name": "a", "next": "x"}]}})


def drawn_pipeline() -> mds.Pipeline:
    return mds.Pipeline(
        "shop",
        [
            mds.Node.function("features", abs),
            mds.Node.router("route", "request.kind", {"a": "ensemble"}, default="b"),
            mds.Node.fan_out("ensemble", ["m1", "m2"], next="decide"),
            mds.Node.function("m1", abs),
            mds.Node.function("m2", abs),
            mds.Node.function("b", abs),
            mds.Node.function("decide", abs),
        ],
    )


def test_drawings_show_every_node_and_edge() -> None:
    pipeline = drawn_pipeline()
    text = pipeline.to_text()
    assert "route     [router by request.kind]  a -> ensemble, default -> b" in text
    assert "ensemble  [fan-out to m1, m2, joined by a mapping by node name]  join -> decide" in text
    assert "m1        [function builtins:abs]  -> join" in text
    mermaid = pipeline.to_mermaid()
    assert mermaid.startswith("flowchart LR")
    assert 'n1 -->|"a"| n2' in mermaid and 'n1 -->|"default"| n5' in mermaid
    assert "n2 --> n3" in mermaid and "n3 --> n2_join" in mermaid and "n2_join --> n6" in mermaid
    dot = pipeline.to_dot()
    assert dot.startswith('digraph "shop" {') and dot.endswith("}")
    assert '"route" -> "b" [label="default"];' in dot
    assert '"ensemble_join" -> "decide";' in dot
    assert '"decide" -> finish;' in dot


def test_pipeline_show_prints_text_mermaid_and_dot(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pytest.importorskip("torch")  # the seed's example handlers use torch
    assert main(["pipeline", "show", str(SEED)]) == 0
    out, err = capsys.readouterr()
    assert "pipeline test_pipeline (start: m1)" in out
    # An unreachable node is never imported: it says so.
    assert "m2  [model m2.dummy_python_model (not loaded)]  -> m3   (unreachable)" in out
    assert "warning:" in err and "'m2'" in err
    assert main(["pipeline", "show", str(SEED), "--format", "mermaid"]) == 0
    assert capsys.readouterr().out.startswith("flowchart LR")
    target = tmp_path / "seed.dot"
    assert main(["pipeline", "show", str(SEED), "--format", "dot", "-o", str(target)]) == 0
    assert target.read_text().startswith('digraph "test_pipeline"')
    assert "wrote the dot drawing" in capsys.readouterr().out


def test_pipeline_show_imports_only_what_a_call_can_reach(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # The unreachable node's module needs a package this install lacks (as a
    # node needing torch in a core-only install): it is never imported.
    (tmp_path / "light.py").write_text(
        textwrap.dedent(
            """
            import mds

            class Light(mds.ModelHandler):
                def infer(self, batch):
                    return list(batch)

            def tidy(value):
                return value
            """
        )
    )
    (tmp_path / "heavy.py").write_text("import a_package_that_is_not_installed\n")
    document = tmp_path / "pipeline.yaml"
    document.write_text(
        textwrap.dedent(
            """
            pipeline:
              name: partly
              nodes:
              - name: tidy
                function: light:tidy
                next: light
              - name: heavy
                model_load_meta: {handler_module: heavy}
              - name: light
                model_load_meta: {handler_module: light}
                next: null
              - name: old_router
                router: {by: heavy:route, routes: {a: light}}
            """
        )
    )
    assert main(["pipeline", "show", str(document)]) == 0
    out = capsys.readouterr().out
    assert "light       [model light:Light]  -> end" in out
    assert "heavy       [model heavy (not loaded)]  -> light   (unreachable)" in out
    assert "old_router  [router by heavy:route (not loaded)]  a -> light   (unreachable)" in out
    assert "a_package_that_is_not_installed" not in sys.modules
    # What a call can reach is imported, and its problems are named.
    document.write_text(document.read_text().replace("next: light", "next: heavy"))
    assert main(["pipeline", "show", str(document)]) == 1
    assert "No module named 'a_package_that_is_not_installed'" in capsys.readouterr().err


def test_pipeline_show_fails_with_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "pipeline:\n  name: p\n  nodes:\n  - {name: a, function: 'os:getcwd', next: b}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "mds", "pipeline", "show", str(bad)],
        capture_output=True,
        text=True,
        check=False,
        timeout=45,
    )
    assert done.returncode == 1
    assert "node 'a' (pipeline.nodes[0]): next 'b' is not a node" in done.stderr
