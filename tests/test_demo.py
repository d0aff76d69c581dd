"""`kdfast demo` at a tiny size, its data options and messages, and fasterai's tutorial run
verbatim (only its import line changed) on local files."""
import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("fastai")
pytest.importorskip("sklearn")
from helpers import offline_tutorial_env, write_digit_images  # noqa: E402

from kdfast import demo  # noqa: E402


def test_demo_tiny_run(tmp_path, capsys):
    out = tmp_path / "out"
    assert demo.main(["--epochs", "1", "--size", "32", "--bs", "16", "--limit", "60", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "train_loss" in printed and "valid_loss" in printed  # fastai's epoch tables
    assert "KD overhead" in printed and "SoftTarget + cos" in printed
    results = json.loads((out / "results.json").read_text())
    assert list(results["runs"]) == ["teacher ResNet-34", "student alone", "SoftTarget + cos",
                                     "Attention (weight 0.9)"]
    assert results["pairs"] == {"student": ["conv1", "layer1", "layer2", "layer3"],
                                "teacher": ["0.0", "0.4", "0.5", "0.6"]}
    for row in results["summary"]:
        assert 0 <= row["final_accuracy"] <= 1 and row["s_per_epoch"] > 0
    assert [("kd_overhead" in r) for r in results["summary"]] == [False, False, True, True]
    assert (out / "accuracy.png").stat().st_size > 1000
    assert len(list((out / "digits").glob("*.png"))) == 60


def test_demo_on_a_folder_labelled_by_file_name(tmp_path, capsys):
    names = [f"{'Cat' if i % 2 else 'dog'}_{i}.png" for i in range(40)]
    data = write_digit_images(tmp_path / "pets" / "images", names)
    out = tmp_path / "out"
    assert demo.main(["--data", str(data.parent), "--label", r"regex:^(\w+?)_", "--epochs", "1", "--size", "32",
                      "--bs", "16", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["classes"] == ["Cat", "dog"] and results["images"] == 40


@pytest.mark.parametrize("args,message", [
    (["--data", "{tmp}/nowhere"], "no such folder"),
    (["--data", "{tmp}/empty"], "no image files"),
    (["--data", "{tmp}/one", "--label", "uppercase-first"], "every one of the 3 images gets the label 'False'"),
    (["--data", "{tmp}/one", "--label", "regex:^x(\\d)"], "does not match the file name"),
    (["--data", "{tmp}/one", "--label", "regex:("], "not a valid regular expression"),
    (["--label", "stem"], "is not a labelling rule"),
])
def test_demo_data_messages(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    write_digit_images(tmp_path / "one", ["a_1.png", "b_2.png", "c_3.png"])
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert demo.main(args + ["--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_label_rules():
    assert demo.label_function("uppercase-first")("x/Abyssinian_1.jpg") is True
    assert demo.label_function("prefix")("x/great_pyrenees_12.jpg") == "great_pyrenees"
    assert demo.label_function("parent")("data/cats/1.jpg") == "cats"
    assert demo.label_function(r"regex:(\d+)\.png$")("img_42.png") == "42"


# fasterai's tutorial (fasterai.distill, "KnowledgeDistillation Callback"), code cells verbatim,
# `from fasterai.distill.all import *` replaced by kdfast's import line.
SEED_TUTORIAL = '''
from kdfast.all import *

path = untar_data(URLs.PETS)
files = get_image_files(path/"images")

def label_func(f): return f[0].isupper()

dls = ImageDataLoaders.from_name_func(path, files, label_func, item_tfms=Resize(64))

teacher = vision_learner(dls, resnet34, metrics=accuracy)
teacher.unfreeze()
teacher.fit_one_cycle(10, 1e-3)

student = Learner(dls, resnet18(num_classes=2), metrics=accuracy)
student.fit_one_cycle(10, 1e-3)

student = Learner(dls, resnet18(num_classes=2), metrics=accuracy)
kd = KnowledgeDistillationCallback(teacher.model, SoftTarget, schedule=cos)
student.fit_one_cycle(10, 1e-3, cbs=kd)

student_model = resnet18(num_classes=2)

# Auto-match layers by spatial resolution
pairs = match_feature_layers(student_model, teacher.model, torch.randn(1, 3, 64, 64))
print(pairs)
# {'student': ['conv1', 'layer1', 'layer2', 'layer3', 'layer4'],
#  'teacher': ['conv1', 'layer1', 'layer2', 'layer3', 'layer4']}

student = Learner(dls, student_model, metrics=accuracy)
kd = KnowledgeDistillationCallback(
    teacher.model, Attention,
    pairs['student'], pairs['teacher'],
    weight=0.9
)
student.fit_one_cycle(10, 1e-3, cbs=kd)
'''


def test_the_tutorial_runs_with_only_its_import_changed(tmp_path):
    """Offline (helpers.offline_tutorial_env): a local oxford-iiit-pet folder of 24 small
    images, random resnet34 weights in torchvision's cache."""
    script = tmp_path / "tutorial.py"
    script.write_text(textwrap.dedent(SEED_TUTORIAL))
    run = subprocess.run([sys.executable, str(script)], env=offline_tutorial_env(tmp_path), capture_output=True,
                         text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert ("{'student': ['conv1', 'layer1', 'layer2', 'layer3', 'layer4'], "
            "'teacher': ['0.0', '0.4', '0.5', '0.6', '0']}") in run.stdout
