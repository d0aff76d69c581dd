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
    """The tutorial's setting (one seed): the tutorial's models, names and layer pairs."""
    out = tmp_path / "out"
    assert demo.main(["--setting", "tutorial", "--seeds", "1", "--epochs", "1", "--size", "32", "--bs", "16",
                      "--limit", "60", "--out", str(out)]) == 0
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
    assert (results["teacher"], results["student"], results["teacher_epochs"], results["seeds"]) == \
        ("resnet34", "resnet18", 1, [0])
    assert all(r["train_images"] == results["train_images"] == 48 for r in results["summary"])
    assert (out / "accuracy.png").stat().st_size > 1000
    assert len(list((out / "digits").glob("*.png"))) == 60


def test_demo_low_data_seeds(tmp_path, capsys):
    """The default setting at a tiny size: the teacher trained once on every training image,
    each student on --student-images of them per seed; the summary is computed from the seeds'
    own curves."""
    out = tmp_path / "out"
    assert demo.main(["--seeds", "3,5", "--epochs", "2", "--teacher-epochs", "1", "--teacher", "resnet18",
                      "--student-images", "20", "--student-bs", "8", "--bs", "16", "--limit", "70", "--T", "4",
                      "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "vs alone" in printed and "mean ± std over seeds 3, 5" in printed
    results = json.loads((out / "results.json").read_text())
    assert (results["setting"], results["student"], results["seeds"], results["T"]) == ("low-data", "small-cnn",
                                                                                       [3, 5], 4.0)
    assert list(results["runs"]) == ["teacher ResNet-18", "student alone", "SoftTarget T=4, weight 0.9",
                                     "Attention (weight 0.9)"]
    assert results["pairs"]["student"] == ["layer1", "layer2", "layer3"]
    teacher, *students = results["summary"]
    assert teacher["seeds"] == [42] and teacher["train_images"] == 56 and teacher["epochs"] == 1
    alone = results["runs"]["student alone"]
    for row in students:
        run = results["runs"][row["model"]]
        assert row["seeds"] == [3, 5] and row["train_images"] == 20 and row["epochs"] == 2
        assert [len(r["accuracy"]) for r in run["per_seed"]] == [2, 2]
        finals = [r["accuracy"][-1] for r in run["per_seed"]]
        assert row["final_accuracy_per_seed"] == finals
        assert row["final_accuracy"] == pytest.approx(sum(finals) / 2)
        assert row["final_accuracy_std"] == pytest.approx(abs(finals[0] - finals[1]) / 2 ** 0.5)
        curves = [r["accuracy"] for r in run["per_seed"]]
        assert run["accuracy"] == pytest.approx([(a + b) / 2 for a, b in zip(*curves)])
        if row["model"] != "student alone":
            gains = [f - r["accuracy"][-1] for f, r in zip(finals, alone["per_seed"])]
            assert row["gain_over_alone"] == pytest.approx(sum(gains) / 2)
    assert (out / "accuracy.png").stat().st_size > 1000


def test_student_images_differ_by_seed_validation_images_do_not(tmp_path):
    files = demo.write_digits(tmp_path / "digits", limit=100)
    label = demo.label_function("prefix")
    full = demo.make_dataloaders(files, label, 16, 8, seed=42)
    subsets = [demo.make_dataloaders(files, label, 16, 8, seed=42, train_images=30, subset_seed=s, vocab=full.vocab)
               for s in (0, 1, 0)]
    trains = [sorted(map(str, d.train_ds.items)) for d in subsets]
    assert all(len(t) == 30 and set(t) <= set(map(str, full.train_ds.items)) for t in trains)
    assert trains[0] == trains[2] and trains[0] != trains[1]
    assert all(list(d.valid_ds.items) == list(full.valid_ds.items) and d.vocab == full.vocab for d in subsets)


def test_spread_and_aggregate():
    """Mean ± sample std, min and max over seeds, per epoch and for the final accuracy."""
    assert demo.spread([0.5, 0.7, 0.9]) == pytest.approx({"mean": 0.7, "std": 0.2, "min": 0.5, "max": 0.9})
    assert demo.spread([0.8]) == {"mean": 0.8, "std": 0.0, "min": 0.8, "max": 0.8}
    run = {"seeds": [0, 1], "train_images": 10, "epochs": 2,
           "per_seed": [{"accuracy": [0.2, 0.6], "epoch_s": [1.0, 3.0], "train_s": [1.0, 2.0]},
                        {"accuracy": [0.4, 0.8], "epoch_s": [2.0, 4.0], "train_s": [2.0, 4.0]}]}
    agg = demo.aggregate(run)
    assert agg["accuracy"] == pytest.approx([0.3, 0.7])
    assert agg["accuracy_min"] == [0.2, 0.6] and agg["accuracy_max"] == [0.4, 0.8]
    assert agg["accuracy_std"] == pytest.approx([0.1 * 2 ** 0.5] * 2)
    alone = demo.aggregate({**run, "per_seed": [{"accuracy": [0.1, 0.5], "epoch_s": [1.0], "train_s": [1.0]},
                                                {"accuracy": [0.1, 0.9], "epoch_s": [1.0], "train_s": [1.0]}]})
    row = demo._summary_row("kd", agg, alone)
    assert row["final_accuracy"] == pytest.approx(0.7) and row["final_accuracy_per_seed"] == [0.6, 0.8]
    assert row["gain_over_alone"] == pytest.approx(0.0)  # +0.1 and -0.1, seed by seed
    assert row["gain_over_alone_min"] == pytest.approx(-0.1) and row["gain_over_alone_max"] == pytest.approx(0.1)
    assert row["best_accuracy"] == pytest.approx(0.7) and row["train_s_per_epoch"] == 2.0
    assert row["kd_overhead"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="different lengths"):
        demo.aggregate({**run, "per_seed": [{"accuracy": [0.1]}, {"accuracy": [0.1, 0.2]}]})


def test_seeds_option():
    assert demo.parse_seeds("3") == [0, 1, 2]
    assert demo.parse_seeds("4,2,9") == [4, 2, 9]
    assert demo.parse_seeds("7,") == [7]
    for bad, message in [("0", "at least 1"), ("a,b", "comma-separated list"), ("1,1", "each once")]:
        with pytest.raises(demo.DemoError, match=message):
            demo.parse_seeds(bad)


def test_demo_on_a_folder_labelled_by_file_name(tmp_path, capsys):
    names = [f"{'Cat' if i % 2 else 'dog'}_{i}.png" for i in range(40)]
    data = write_digit_images(tmp_path / "pets" / "images", names)
    out = tmp_path / "out"
    assert demo.main(["--setting", "tutorial", "--seeds", "1", "--data", str(data.parent), "--label", r"regex:^(\w+?)_",
                      "--epochs", "1", "--size", "32",
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
    (["--seeds", "x"], "give a count"),
    (["--limit", "40", "--student-images", "8", "--student-bs", "16"], "fewer than the students' batch"),
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
