"""Class-folder and CoOp split-file readers: layouts, class names, splits, bad input."""
import json
import os

import pytest

from fastprompt.data import DatasetSplits, load_coop_split, load_dataset, load_image_folder
from fastprompt.data.source import DataSource


def _flat_tree(root, write_image, counts):
    """root/<folder>/img_k.png with counts[folder] images each; returns {folder: [paths]}."""
    return {folder: [write_image(os.path.join(root, folder, f"img_{k}.png")) for k in range(n)]
            for folder, n in counts.items()}


def test_flat_layout_split_is_deterministic_and_complete(tmp_path, write_image):
    counts = {"b_class": 7, "a_class": 10, "c": 2}
    files = _flat_tree(tmp_path, write_image, counts)
    os.makedirs(tmp_path / ".hidden")  # ignored
    s = load_image_folder(tmp_path, test_fraction=0.3, seed=5)
    assert s.classnames == ["a class", "b class", "c"]  # sorted by folder, '_' -> ' '
    folder_of = {0: "a_class", 1: "b_class", 2: "c"}
    for label, folder in folder_of.items():
        train = sorted(p for p, y in s.train if y == label)
        test = sorted(p for p, y in s.test if y == label)
        assert sorted(train + test) == sorted(files[folder])
        n = counts[folder]
        assert len(test) == min(max(round(n * 0.3), 1), n - 1)
    assert s.val == [] and s.skipped == []
    again = load_image_folder(tmp_path, test_fraction=0.3, seed=5)
    assert again == s
    other = load_image_folder(tmp_path, test_fraction=0.3, seed=6)
    assert {p for p, _ in other.test} != {p for p, _ in s.test}  # 10-choose-3 x 7-choose-2 ways


def test_zero_test_fraction_keeps_everything_for_training(tmp_path, write_image):
    _flat_tree(tmp_path, write_image, {"x": 3, "y": 4})
    s = load_image_folder(tmp_path, test_fraction=0.0)
    assert len(s.train) == 7 and s.test == []


def test_train_test_layout(tmp_path, write_image):
    for split, n in (("train", 3), ("test", 2), ("val", 1)):
        for folder in ("dog", "hot_dog"):
            for k in range(n):
                write_image(os.path.join(tmp_path, split, folder, "sub", f"{k}.jpg"))
    s = load_image_folder(tmp_path)
    assert s.classnames == ["dog", "hot dog"]
    assert (len(s.train), len(s.test), len(s.val)) == (6, 4, 2)
    for split in (s.train, s.test, s.val):
        for path, label in split:
            assert os.path.basename(os.path.dirname(os.path.dirname(path))) == \
                ["dog", "hot_dog"][label]


def test_test_split_with_unknown_class_is_refused(tmp_path, write_image):
    write_image(os.path.join(tmp_path, "train", "a", "0.png"))
    write_image(os.path.join(tmp_path, "train", "b", "0.png"))
    write_image(os.path.join(tmp_path, "test", "zebra", "0.png"))
    with pytest.raises(ValueError, match=r"^root: .*zebra"):
        load_image_folder(tmp_path)


def test_no_images_one_class_and_empty_class(tmp_path, write_image):
    os.makedirs(tmp_path / "empty" / "a")
    with pytest.raises(ValueError, match="^root: no class sub-folders with images"):
        load_image_folder(tmp_path / "empty")
    write_image(os.path.join(tmp_path, "one", "only", "0.png"))
    with pytest.raises(ValueError, match="^root: found only one class .'only'"):
        load_image_folder(tmp_path / "one")
    write_image(os.path.join(tmp_path, "gap", "a", "0.png"))
    write_image(os.path.join(tmp_path, "gap", "b", "0.png"))
    os.makedirs(tmp_path / "gap" / "c")
    with pytest.raises(ValueError, match=r"^root: class folder.*gap/c"):
        load_image_folder(tmp_path / "gap")
    with pytest.raises(ValueError, match="^root: .* is not a directory"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="^test_fraction"):
        load_image_folder(tmp_path / "gap", test_fraction=1.0)


def test_unreadable_images_are_skipped_with_a_warning(tmp_path, write_image):
    _flat_tree(tmp_path, write_image, {"a": 3, "b": 3})
    bad = tmp_path / "a" / "broken.png"
    bad.write_bytes(b"\x89PNG but not really")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\).*broken.png"):
        s = load_image_folder(tmp_path, test_fraction=0.0)
    assert s.skipped == [str(bad)]
    assert len(s.train) == 6 and str(bad) not in {p for p, _ in s.train}
    unchecked = load_image_folder(tmp_path, test_fraction=0.0, check_images=False)
    assert str(bad) in {p for p, _ in unchecked.train}


def test_a_class_of_only_unreadable_images_is_an_error(tmp_path, write_image):
    write_image(os.path.join(tmp_path, "a", "0.png"))
    os.makedirs(tmp_path / "b")
    (tmp_path / "b" / "0.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"^root: .*b.* no readable"):
        load_image_folder(tmp_path)


def test_fifos_named_like_images_are_skipped_never_opened(tmp_path, write_image, within):
    """A FIFO (or socket, device) named like an image is not an image: opening it would block
    until a writer comes. The readers list it as skipped and never open it (issue 23, item 2)."""
    _flat_tree(tmp_path, write_image, {"a": 3, "b": 3})
    fifo = tmp_path / "a" / "upload.jpg"
    os.mkfifo(fifo)
    for check in (True, False):
        with pytest.warns(UserWarning, match=r"upload\.jpg"):
            s = within(30, lambda: load_image_folder(tmp_path, check_images=check), fifos=[fifo])
        assert s.skipped == [str(fifo)]
        assert str(fifo) not in {p for p, _ in s.train + s.test}
        assert len(s.train + s.test) == 6


def test_a_split_file_listing_a_fifo_is_refused(tmp_path, write_image, within):
    write_image(os.path.join(tmp_path, "a", "0.png"))
    write_image(os.path.join(tmp_path, "b", "0.png"))
    os.mkfifo(tmp_path / "b" / "1.png")
    split = tmp_path / "split_zhou_Fifo.json"
    split.write_text(json.dumps({"train": [["a/0.png", 0, "a"], ["b/0.png", 1, "b"]],
                                 "test": [["b/1.png", 1, "b"]]}))
    with pytest.raises(ValueError, match=r"^split_file: .*b/1.png.* a FIFO, not a regular file"):
        within(30, load_coop_split, split, fifos=[tmp_path / "b" / "1.png"])


def _coop_tree(tmp_path, write_image):
    """CoOp-style: dataset/split_zhou_Toy.json, images in dataset/images/<class>/..."""
    root = tmp_path / "toy"
    entries = {"train": [], "val": [], "test": []}
    for label, name in enumerate(["tabby_cat", "bulldog"]):
        for split, n in (("train", 3), ("val", 1), ("test", 2)):
            for k in range(n):
                rel = f"{name}/{split}_{k}.jpg"
                write_image(os.path.join(root, "images", rel))
                entries[split].append([rel, label, name])
    (root / "split_zhou_Toy.json").write_text(json.dumps(entries))
    return root, entries


def test_coop_split_file(tmp_path, write_image):
    root, entries = _coop_tree(tmp_path, write_image)
    s = load_coop_split(root / "split_zhou_Toy.json")
    assert isinstance(s, DatasetSplits)
    assert s.classnames == ["tabby cat", "bulldog"]
    assert s.root == str(root / "images")
    for split in ("train", "val", "test"):
        got = getattr(s, split)
        assert got == [(str(root / "images" / rel), label) for rel, label, _ in entries[split]]
    assert load_dataset(root) == s  # found automatically


def test_coop_split_missing_file_is_named(tmp_path, write_image):
    root, entries = _coop_tree(tmp_path, write_image)
    os.remove(root / "images" / "bulldog" / "test_1.jpg")
    with pytest.raises(ValueError, match=r"^split_file: .*'bulldog/test_1.jpg'.*does not exist"):
        load_coop_split(root / "split_zhou_Toy.json")


@pytest.mark.parametrize("mutate, message", [
    (lambda e: e["train"][0].__setitem__(2, "other"), "label 0 is named both"),
    (lambda e: [row.__setitem__(1, row[1] + 1) for s in e.values() for row in s],
     "labels must be 0..C-1"),
    (lambda e: e["train"].append(["x.jpg", 0]), r"train\[6\] must be"),
    (lambda e: e.pop("test"), "must be a JSON object with 'train' and 'test'"),
])
def test_coop_split_malformed(tmp_path, write_image, mutate, message):
    root, entries = _coop_tree(tmp_path, write_image)
    mutate(entries)
    (root / "split_zhou_Toy.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="^split_file: .*" + message):
        load_coop_split(root / "split_zhou_Toy.json")


def test_a_split_file_outside_the_data_folder_is_refused(tmp_path, write_image):
    """--split-file is relative to --data, or an absolute path inside it; one outside would
    silently ignore --data (its images are read relative to the split file's own folder), so it
    is refused (issue 23, item 15)."""
    root, _ = _coop_tree(tmp_path, write_image)
    split = root / "split_zhou_Toy.json"
    inside = load_dataset(root, split_file="split_zhou_Toy.json")
    assert load_dataset(root, split_file=str(split)) == inside  # absolute, inside: the same
    assert DataSource.create(root, split_file=str(split)).load() == inside
    other = tmp_path / "other"
    other.mkdir()
    for given in (str(split), "../toy/split_zhou_Toy.json"):
        with pytest.raises(ValueError, match=r"^split_file: .*split_zhou_Toy.json.* is outside "
                                             r"the data folder .*other"):
            load_dataset(other, split_file=given)
        with pytest.raises(ValueError, match="is outside the data folder"):
            DataSource.create(other, split_file=given).load()


def test_load_dataset_falls_back_to_folders(tmp_path, write_image):
    _flat_tree(tmp_path, write_image, {"a": 2, "b": 2})
    assert load_dataset(tmp_path, seed=2) == load_image_folder(tmp_path, seed=2)


# ---------------------------------------------------------------------------------------------
# Layouts that used to be misread without a word (issue 14, items 14-16)


@pytest.mark.parametrize("train, test, val", [("Train", "Test", None), ("TRAIN", "test", "Val"),
                                              ("train", "test", "valid"),
                                              ("train", "Test", "validation")])
def test_split_folders_any_case_and_validation_names(tmp_path, write_image, train, test, val):
    for split, n in ((train, 2), (test, 1), (val, 1)):
        if split is None:
            continue
        for cls in ("cat", "dog"):
            for k in range(n):
                write_image(os.path.join(tmp_path, split, cls, f"{k}.png"))
    s = load_image_folder(tmp_path)
    assert s.classnames == ["cat", "dog"]
    assert (len(s.train), len(s.test), len(s.val)) == (4, 2, 2 if val else 0)


@pytest.mark.parametrize("folders, match", [
    (("train", "val"), "not both a train and a test folder"),
    (("Train", "train", "test"), "several folders for one split"),
    (("train", "test", "val", "validation"), "several folders for one split"),
    (("train", "test", "extra_class"), "mixes split folders .* with other folders"),
])
def test_ambiguous_layouts_are_refused(tmp_path, write_image, folders, match):
    for f in folders:
        inner = os.path.join(tmp_path, f) if f == "extra_class" else os.path.join(tmp_path, f, "cat")
        write_image(os.path.join(inner, "0.png"))
        if f != "extra_class":
            write_image(os.path.join(tmp_path, f, "dog", "0.png"))
    with pytest.raises(ValueError, match="^root: .*" + match):
        load_image_folder(tmp_path)


def test_links_back_into_the_tree_are_skipped(tmp_path, write_image):
    data = tmp_path / "data"
    for cls in ("cat", "dog"):
        for k in range(2):
            write_image(os.path.join(data, cls, f"{k}.png"))
    os.symlink(".", data / "everything")                 # a class of copies of every image
    os.symlink(data / "cat" / "0.png", data / "dog" / "9.png")  # a duplicate image
    os.symlink("..", data / "cat" / "up")                # a loop
    elsewhere = tmp_path / "elsewhere"
    write_image(os.path.join(elsewhere, "x.png"))
    os.symlink(elsewhere, data / "dog" / "more")         # outside the tree: followed
    s = load_image_folder(data, test_fraction=0.0)
    assert s.classnames == ["cat", "dog"]
    assert sorted(os.path.relpath(p, data) for p, _ in s.train) == [
        "cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png", "dog/more/x.png"]


def test_class_names_with_control_characters_are_refused_when_read(tmp_path, write_image):
    write_image(os.path.join(tmp_path, "cat", "0.png"))
    write_image(os.path.join(tmp_path, "bad\nname", "0.png"))
    with pytest.raises(ValueError, match=r"^root: class name 'bad\\nname' contains the control"):
        load_image_folder(tmp_path)


@pytest.mark.parametrize("folder", ["cat\u202egnp.exe", "zero\u200bwidth", "tab\tbed",
                                    "esc\x1b[2J", "_"])
def test_hostile_class_folders_are_refused(tmp_path, write_image, folder):
    """Class folders are checked as every source of class names (issue 23, item 4)."""
    write_image(os.path.join(tmp_path, "dog", "0.png"))
    write_image(os.path.join(tmp_path, folder, "0.png"))
    with pytest.raises(ValueError, match=r"^root: class name .* (contains the control|is empty)"):
        load_image_folder(tmp_path)


def test_hostile_class_names_in_a_split_file_are_refused(tmp_path, write_image):
    write_image(os.path.join(tmp_path, "a", "0.png"))
    write_image(os.path.join(tmp_path, "b", "0.png"))
    split = tmp_path / "split_zhou_X.json"
    split.write_text(json.dumps({"train": [["a/0.png", 0, "a"], ["b/0.png", 1, "b\u200b"]],
                                 "test": []}))
    with pytest.raises(ValueError, match=r"^split_file: .*U\+200B ZERO WIDTH SPACE"):
        load_coop_split(split)


def test_class_names_are_nfc(tmp_path, write_image):
    import unicodedata
    nfd = unicodedata.normalize("NFD", "café_crème")
    assert nfd != unicodedata.normalize("NFC", nfd)
    write_image(os.path.join(tmp_path, nfd, "0.png"))
    write_image(os.path.join(tmp_path, "tea", "0.png"))
    s = load_image_folder(tmp_path, test_fraction=0.0)
    assert s.classnames == ["café crème", "tea"]
    assert s.classnames[0] == unicodedata.normalize("NFC", s.classnames[0])
    # The NFD and NFC spellings of one name are one class twice: refused.
    write_image(os.path.join(tmp_path, unicodedata.normalize("NFC", nfd), "0.png"))
    with pytest.raises(ValueError, match="map to the same class name"):
        load_image_folder(tmp_path)


@pytest.mark.parametrize("rel", ["../outside.png", "/etc/passwd", "cat/../../outside.png"])
def test_split_file_paths_are_confined_to_the_root(tmp_path, write_image, rel):
    root = tmp_path / "ds"
    write_image(os.path.join(tmp_path, "outside.png"))
    entries = {"train": [["cat/0.png", 0, "cat"], ["dog/0.png", 1, "dog"], [rel, 1, "dog"]],
               "test": [["cat/0.png", 0, "cat"]]}
    for cls in ("cat", "dog"):
        write_image(os.path.join(root, cls, "0.png"))
    (root / "split_zhou_X.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=r"^split_file: .* lists 1 path\(s\) outside the image "
                                         r"root .*first: train\[2\]") as info:
        load_coop_split(root / "split_zhou_X.json", image_root=root)
    assert "passwd" not in str(info.value) and "outside.png" not in str(info.value)


def test_deeply_nested_split_file_is_named(tmp_path):
    path = tmp_path / "split_zhou_Deep.json"
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match=r"^split_file: .*split_zhou_Deep.json.* is not valid JSON"):
        load_coop_split(path)
