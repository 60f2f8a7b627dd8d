"""Unit tests of the block file format and the label <-> path mapping (model.Location)."""
import errno

import pytest
import yaml

from memfuse import blockfile
from memfuse.blockfile import BlockFileError, parse, plan_update, render
from memfuse.model import Block, Location


def block(**kw) -> Block:
    fields = dict(id="block-1", label="human", value="Hello.\n", limit=20000,
                  description="What this block contains")
    fields.update(kw)
    return Block(**fields)


def test_render_layout_is_frontmatter_then_value_byte_for_byte():
    assert render(block()) == (b"---\ndescription: What this block contains\nlimit: 20000\n"
                               b"---\nHello.\n")


@pytest.mark.parametrize("description", [
    "What: a colon", "'single' and \"double\" quotes", "line one\nline two", "# not a comment",
    "yes", "null", "123", "  padded  ", "ünïcödé ✓", "- list-looking", "---", "a" * 300,
])
@pytest.mark.parametrize("value", ["", "plain", "---\nlooks like frontmatter\n---\n", "\n\n",
                                   "no newline at end", "tabs\tand trailing spaces  \n",
                                   "emoji 🧠\n", "line\r\nwith CRLF"])
def test_round_trip_is_a_no_op(description, value):
    original = block(description=description, value=value)
    parsed = parse(render(original))
    assert parsed.value == value
    assert parsed.fields["description"] == description
    assert plan_update(original, parsed) == {}


def test_read_only_rendered_only_when_true():
    assert b"read_only" not in render(block())
    assert b"read_only: true\n" in render(block(read_only=True))


@pytest.mark.parametrize("description", [None, "", "   "])
def test_a_missing_description_shows_letta_s_default_and_round_trips(description):
    original = block(description=description, label="notes/todo")
    data = render(original)
    assert data.startswith(b"---\ndescription: notes/todo block\nlimit: 20000\n---\n")
    assert plan_update(original, parse(data)) == {}  # the default is never sent
    assert blockfile.applied(original, parse(data)).description == description


def test_the_default_description_is_sent_once_changed_or_on_a_block_that_has_one():
    original = block(description=None, label="notes")
    assert plan_update(original, parse(b"---\ndescription: My notes\n---\nHello.\n")) == {
        "description": "My notes"}
    assert plan_update(original, parse(b"---\ndescription: other block\n---\nHello.\n")) == {
        "description": "other block"}
    described = block(label="notes")  # a real description replaced by the default's words
    assert plan_update(described, parse(b"---\ndescription: notes block\n---\nHello.\n")) == {
        "description": "notes block"}


def test_a_write_that_omits_limit_or_description_leaves_them_as_they_are():
    original = block(limit=500)
    assert plan_update(original, parse(b"---\nlimit: 500\n---\nNew.\n")) == {"value": "New.\n"}
    assert plan_update(original, parse(b"---\ndescription: What this block contains\n---\n"
                                       b"New.\n")) == {"value": "New.\n"}
    assert plan_update(original, parse(b"---\n---\nNew.\n")) == {"value": "New.\n"}
    assert blockfile.applied(original, parse(b"---\n---\nNew.\n")) == block(
        limit=500, value="New.\n")


def test_no_frontmatter_replaces_value_only():
    parsed = parse(b"The human is Ada.\n")
    assert not parsed.has_frontmatter
    assert plan_update(block(), parsed) == {"value": "The human is Ada.\n"}


def test_changed_metadata_is_sent():
    data = b"---\ndescription: New words\nlimit: 50\n---\nHello.\n"
    assert plan_update(block(), parse(data)) == {"description": "New words", "limit": 50}


def test_frontmatter_closing_at_end_of_file():
    assert parse(b"---\nlimit: 5\n---").value == ""
    assert parse(b"---\n---\nbody").fields == {}


@pytest.mark.parametrize("data, words", [
    (b"---\nfoo: 1\n---\nx", "unknown frontmatter key(s): foo"),
    (b"---\ndescription: ''\n---\nx", "description must be a non-empty string"),
    (b"---\ndescription: 5\n---\nx", "description must be a non-empty string"),
    (b"---\nlimit: 0\n---\nx", "limit must be a positive integer"),
    (b"---\nlimit: -3\n---\nx", "limit must be a positive integer"),
    (b"---\nlimit: true\n---\nx", "limit must be a positive integer"),
    (b"---\nlimit: '12'\n---\nx", "limit must be a positive integer"),
    (b"---\nread_only: maybe\n---\nx", "read_only must be true or false"),
    (b"---\nlimit: [1\n---\nx", "not valid YAML"),
    (b"---\n- a list\n---\nx", "must be a mapping"),
    (b"---\nlimit: 5\nno closing", "never closed"),
    (b"caf\xe9", "not valid UTF-8 (byte offset 3)"),
    (b"a\0b", "NUL byte at offset 1"),
])
def test_bad_files_are_einval_with_reason(data, words):
    with pytest.raises(BlockFileError) as caught:
        parse(data)
    assert caught.value.errno == errno.EINVAL
    assert words in caught.value.reason


def test_read_only_cannot_change():
    with pytest.raises(BlockFileError) as caught:
        plan_update(block(), parse(b"---\nread_only: true\n---\nx"))
    assert caught.value.errno == errno.EINVAL


def test_value_over_limit_is_efbig_counting_characters():
    fits = parse(("é" * 10).encode())
    assert plan_update(block(limit=10), fits) == {"value": "é" * 10}  # 20 bytes, 10 characters
    with pytest.raises(BlockFileError) as caught:
        plan_update(block(limit=10), parse(("é" * 11).encode()))
    assert caught.value.errno == errno.EFBIG
    assert "11 characters, over the limit of 10" in caught.value.reason


def test_new_limit_in_same_write_is_what_counts():
    data = b"---\nlimit: 3\n---\nabcd"
    with pytest.raises(BlockFileError) as caught:
        plan_update(block(limit=100), parse(data))
    assert caught.value.errno == errno.EFBIG


def test_render_is_valid_yaml_even_for_hostile_descriptions():
    data = render(block(description="key: value\n---\n- x"))
    front = data.split(b"\n---\n", 1)[0][4:]
    assert yaml.safe_load(front)["description"] == "key: value\n---\n- x"


@pytest.mark.parametrize("label, parts", [
    ("human", ("human.md",)),
    ("projects/letta", ("projects", "letta.md")),
    ("a/b/c", ("a", "b", "c.md")),
    ("notes.md", ("notes.md.md",)),
])
@pytest.mark.parametrize("attached", [True, False])
def test_label_path_round_trip(label, parts, attached):
    location = Location(attached, label)
    expected = (("system",) if attached else ()) + parts
    assert location.parts() == expected
    assert Location.at(expected) == location


@pytest.mark.parametrize("label", ["", "/x", "x/", "a//b", "a/../b", "./a", "../x", "a\0b", "a\nb",
                                   "tab\there", "x" * 253, "#x#", ".#lock"])
def test_labels_that_cannot_be_paths(label):
    assert Location(True, label).parts() is None and Location(False, label).parts() is None


def test_a_detached_block_cannot_land_inside_system():
    assert Location(False, "system/x").parts() is None
    assert Location(True, "system/x").parts() == ("system", "system", "x.md")


@pytest.mark.parametrize("parts", [(), ("x.txt",), (".md",), ("human.md.swp",), ("dir", "4913"),
                                   ("system", "#a.md#"), ("a\nb.md",)])
def test_paths_that_are_not_blocks(parts):
    assert Location.at(parts) is None


@pytest.mark.parametrize("data", [
    b"---\ndescription: 2024-13-45\n---\nhi\n",            # PyYAML: ValueError
    b"---\ndescription: 2024-01-01 25:61:61\n---\nhi\n",   # ValueError
    b"---\n2024-99-01: 1\n---\nhi\n",                      # ValueError in a key
    b"---\nlimit: !!int 1e400\n---\nhi\n",                 # ValueError
    b"---\nlimit: " + b"[" * 3000 + b"]" * 3000 + b"\n---\n",  # RecursionError
    b"---\n" + b"a: {" * 3000 + b"}" * 3000 + b"\n---\n",      # RecursionError
    b"---\n? [a, b]\n: 1\n---\n",                          # an unhashable key
    b"---\n!!python/object:os.system {}\n---\n",           # never constructed
])
def test_any_frontmatter_the_parser_chokes_on_is_einval(data):
    with pytest.raises(BlockFileError) as caught:
        parse(data)
    assert caught.value.errno == errno.EINVAL


def test_a_key_given_twice_is_einval():
    with pytest.raises(BlockFileError) as caught:
        parse(b"---\nlimit: 100\nlimit: 5\n---\nx")
    assert caught.value.errno == errno.EINVAL and "'limit' is given twice" in caught.value.reason


@pytest.mark.parametrize("data", [
    b"---\nlimit: 2147483648\n---\nx",         # past the server's 32-bit column: a 500 there
    b'---\ndescription: "a\\0b"\n---\nx',      # a NUL: the server answers 500
    b'---\ndescription: "\\ud800"\n---\nx',    # a lone surrogate: not storable either
])
def test_what_the_server_cannot_store_is_refused_locally(data):
    with pytest.raises(BlockFileError) as caught:
        parse(data)
    assert caught.value.errno == errno.EINVAL


def test_the_largest_limit_the_server_stores_is_accepted():
    assert parse(b"---\nlimit: 2147483647\n---\nx").fields == {"limit": 2147483647}


@pytest.mark.parametrize("data", [
    b"---\r\ndescription: Windows\r\nlimit: 50\r\n---\r\nvalue\r\nline two\r\n",
    b"\xef\xbb\xbf---\ndescription: Windows\nlimit: 50\n---\nvalue\r\nline two\r\n",
    b"\xef\xbb\xbf---\r\ndescription: Windows\r\nlimit: 50\r\n---\r\nvalue\r\nline two\r\n",
])
def test_crlf_and_bom_frontmatter_is_understood_and_never_folded_into_the_value(data):
    parsed = parse(data)
    assert parsed.fields == {"description": "Windows", "limit": 50}
    assert parsed.value == "value\r\nline two\r\n"


def test_a_bom_without_frontmatter_stays_in_the_value():
    assert parse(b"\xef\xbb\xbfplain").value == "\ufeffplain"


@pytest.mark.parametrize("data, limit, gap, over", [
    (b"short", 5, 0, False),
    (b"longer", 5, 0, True),
    (b"\xc3\xa9" * 5, 5, 0, False),                    # 10 bytes, 5 characters
    (b"---\nlimit: 3\n---\nabcd", 100, 0, True),         # the frontmatter's limit wins
    (b"---\nlimit: 300\n---\n" + b"a" * 200, 100, 0, False),
    (b"---\ndescription: d\n", 2, 0, False),             # frontmatter not closed yet: later
    (b"abc", 10, 1 << 40, True),                         # a gap is counted, never allocated
])
def test_check_partial_tells_a_value_past_its_limit_while_writing(data, limit, gap, over):
    assert (blockfile.check_partial(data, limit, gap) is not None) == over
