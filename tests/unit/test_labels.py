"""``Sampler.label_ids`` / ``gmflow_jax.sampling.labels``: the shipped ImageNet class names against two
independent copies of the ImageNet-1k label order (torchvision's weights metadata, TensorFlow Datasets' SI-Score
list), the lookup rules, and a 1000-class checkpoint read back by the ``Sampler``."""

from __future__ import annotations

import re
import string

import jax
import numpy as np
import pytest
from flax import nnx

from gmflow_jax.sampling import Sampler
from gmflow_jax.sampling.labels import ClassIndex, class_index, imagenet_classes
from gmflow_jax.train.config import load_config

# the ADM / DiT id2label lines at a few ids, as published
ANCHORS = {
    0: "tench, Tinca tinca",
    1: "goldfish, Carassius auratus",
    88: "macaw",
    207: "golden retriever",
    134: "crane",
    517: "crane",
    999: "toilet tissue, toilet paper, bathroom tissue",
}


def _plain(name: str) -> str:
    """Lower case letters and digits only, for comparing differently punctuated copies."""
    return "".join(ch for ch in name.lower() if ch in string.ascii_lowercase + string.digits)


@pytest.fixture(scope="module")
def imagenet() -> ClassIndex:
    return class_index(load_config("imagenet_gmdit_k8"))


def test_shipped_names_anchors():
    lines = imagenet_classes()
    assert len(lines) == 1000
    for i, line in ANCHORS.items():
        assert lines[i] == line, i


def test_shipped_names_match_torchvision_order():
    """torchvision's categories are the first synonym, shortened; 134 and 639 are written differently there."""
    pytest.importorskip("torchvision")
    from torchvision.models import ResNet50_Weights

    categories = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    assert len(categories) == 1000
    rewritten = {134: ("crane bird", "crane"), 639: ("maillot tank suit", "maillot, tank suit")}
    for i, (ours, theirs) in enumerate(zip(imagenet_classes(), categories, strict=True)):
        if i in rewritten:
            assert (theirs, ours) == rewritten[i]
        else:
            assert _plain(theirs) in {_plain(s) for s in ours.split(",")}, (i, ours, theirs)


def test_shipped_names_match_tfds_list():
    """TFDS' copy of the 1000 lines, the two cranes disambiguated there."""
    tfds_labels = pytest.importorskip("tensorflow_datasets.datasets.siscore.labels")
    theirs = list(tfds_labels.IMAGENET_LABELS_LIST)
    assert theirs[134] == "crane (bird)" and theirs[517] == "crane (machine)"
    theirs[134] = theirs[517] = "crane"
    assert list(imagenet_classes()) == theirs


def test_every_line_and_synonym_maps_to_its_class(imagenet):
    lines = imagenet_classes()
    counts: dict[str, set[int]] = {}
    for i, line in enumerate(lines):
        for name in {line, *(s.strip() for s in line.split(","))}:
            counts.setdefault(" ".join(name.lower().split()), set()).add(i)
    checked = 0
    for i, line in enumerate(lines):
        for name in {line, *(s.strip() for s in line.split(","))}:
            if counts[" ".join(name.lower().split())] == {i}:
                assert imagenet.ids([name]) == [i], name
                assert imagenet.ids(["  " + name.upper().replace(" ", "   ") + " "]) == [i], name
                checked += 1
    assert checked > 2000
    for i, line in enumerate(lines):  # each whole line but the two cranes names one class
        if i not in (134, 517):
            assert imagenet.ids([line]) == [i], line
    assert imagenet.ids(["tench,Tinca  tinca", "TINCA TINCA", "Golden Retriever", 3]) == [0, 0, 207, 3]
    assert imagenet.ids("macaw") == [88]


def test_shared_synonyms(imagenet):
    assert imagenet.ids(["cardigan", "maillot"]) == [474, 638]  # the class whose whole line it is, then
    assert imagenet.ids(["partridge", "crayfish", "missile"]) == [86, 124, 657]  # the class it is the first name of
    for name, ids in (("crane", (134, 517)), ("grass snake", (55, 57)), ("panda", (387, 388))):
        with pytest.raises(ValueError, match=rf"names classes {ids[0]} .*, {ids[1]} .*: pass the integer id") as e:
            imagenet.ids([name])
        assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "name,nearest",
    [("golden retreiver", "golden retriever"), ("Macaws", "macaw"), ("tool kit box", "tool kit")],
)
def test_unknown_name_suggests_the_nearest(imagenet, name, nearest):
    with pytest.raises(ValueError, match=re.escape(f"unknown class name {name!r}; did you mean {nearest!r}?")) as e:
        imagenet.ids([name])
    assert "\n" not in str(e.value)


def test_bad_ids_and_types(imagenet):
    with pytest.raises(ValueError, match=r"label id 1000 is outside \[0, 1000\)"):
        imagenet.ids([1000])
    with pytest.raises(ValueError, match="class names must be strings"):
        imagenet.ids([1.5])


def test_digits_and_unnamed_models():
    digits = class_index(load_config("digits_gmdit:tiny"))
    assert digits.ids(["0", "Seven", " 3 ", np.int64(9)]) == [0, 7, 3, 9]
    with pytest.raises(ValueError, match=r"unknown class name '10'; did you mean"):
        digits.ids(["10"])
    with pytest.raises(ValueError, match=r"no names \(data\.dataset='imagenet_latents', model\.num_classes=10\)"):
        class_index(load_config("imagenet_gmdit_k8:tiny"))  # the tests' 10-class synthetic ImageNet
    with pytest.raises(ValueError, match=r"no names \(data\.dataset='checkerboard"):
        class_index(load_config("checkerboard_k64:tiny"))


def test_sampler_of_an_imagenet_checkpoint(tmp_path):
    """A 1000-class GM-DiT written as a workdir (as ``convert`` writes the published model) names its classes."""
    from gmflow_jax.convert import write_workdir
    from gmflow_jax.models.factory import build_model, split_params

    config = load_config("imagenet_gmdit_k8:tiny")
    config.model.num_classes = 1000
    _, abstract = split_params(nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    draw = lambda a: (0.02 * rng.standard_normal(a.shape)).astype(a.dtype)  # noqa: E731
    write_workdir(str(tmp_path / "run"), config, jax.tree.map(draw, nnx.to_pure_dict(abstract)))
    sampler = Sampler.from_checkpoint(str(tmp_path / "run"))
    assert sampler.label_ids(["golden retriever"]) == [207]
    assert sampler.label_ids(["macaw", "tench, Tinca tinca", "toilet paper"]) == [88, 0, 999]
