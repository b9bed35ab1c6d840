"""A DreamBooth sweep from scratch: the plan makes the missing class images once, before any trial,
into the folder every trial reads; on a cluster with GPUs a Ray task holding a GPU renders them."""

from pathlib import Path

import pytest
from PIL import Image

from sweeps.class_image_job import ensure_sweep_class_images, gpu_worker_wanted
from sweeps.spec import SpecError, load_spec
from sweeps.trial_plan import build_plan
from trainer.loop import LoraTrainer

ROOT = Path(__file__).resolve().parents[2]


def _instance(root: Path) -> Path:
    root.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (0, 200, 40 * i)).save(root / f"{i}.png")
    return root


def _spec(tmp_path, class_dir: str, *sets):
    return load_spec(ROOT / "examples" / "demo.yaml", [
        f"storage={tmp_path / 'runs'}", f"dataset={_instance(tmp_path / 'instance')}",
        "train.instance_prompt=a lswsks shape", "train.with_prior_preservation=true", "train.class_prompt=a shape",
        f"train.class_data_dir={class_dir}", "train.num_class_images=3",
        "train.class_sampling={steps: 2, sampler: ddim}", f"train.cache_dir={tmp_path / 'cache'}", *sets])


@pytest.mark.parametrize("state", ["missing", "empty", "short"])
def test_the_plan_fills_the_class_folder_once_and_trials_reuse_it(tmp_path, monkeypatch, capsys, state):
    monkeypatch.chdir(tmp_path)  # class_data_dir relative to the working directory, as the dataset
    folder = tmp_path / "class"
    if state != "missing":
        folder.mkdir()
    if state == "short":
        Image.new("RGB", (64, 64), (200, 0, 0)).save(folder / "mine.png")
    spec = _spec(tmp_path, "class")
    plan = build_plan(spec)
    assert plan.fixed["class_data_dir"] == str(folder), "the plan carries the folder, absolute"
    wanted = 2 if state == "short" else 3
    assert sorted(p.name for p in folder.glob("class_*.png")) == [f"class_{i:05d}.png" for i in range(wanted)]
    assert f"class images: {wanted} written into {folder}" in capsys.readouterr().out
    classes = plan.prepared.data.class_examples
    assert len(classes) == 3 and all(e.image_path.parent == folder and e.image_path.is_absolute() for e in classes)
    if state != "missing":  # reuse is the same for every starting state: checked once
        return
    stamps = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert build_plan(spec).prepared.data.class_examples == classes, "a resumed sweep finds them"
    trainer = LoraTrainer.build(plan.train_config({"learning_rate": 1e-3, "rank": 2, "lr_scheduler": "constant"}),
                                prepared=plan.prepared, device="cpu")
    assert "prior_loss" in trainer.step()
    assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps, "no trial makes class images"
    assert "class images:" not in capsys.readouterr().out


def test_a_class_folder_that_is_a_file_is_refused_before_any_model_loads(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SpecError, match=r"train\.class_data_dir: .*afile is a file, not a folder"):
        build_plan(_spec(tmp_path, str(tmp_path / "afile")))


def test_bad_class_sampling_names_its_yaml_path(tmp_path):
    with pytest.raises(SpecError) as err:
        _spec(tmp_path, str(tmp_path / "class"), "train.class_sampling={steps: 0, guidance_scale: 0.5}")
    assert "train.class_sampling.steps: Input should be greater than or equal to 1" in err.value.problems
    assert "train.class_sampling.guidance_scale: Input should be greater than or equal to 1" in err.value.problems


def test_a_local_cpu_sweep_makes_them_in_process(tmp_path):
    assert gpu_worker_wanted(_spec(tmp_path, str(tmp_path / "class")), address=None) is False


@pytest.mark.slow
def test_on_a_cluster_with_gpus_a_gpu_worker_renders_them_never_the_head(ray_cluster, tmp_path, capsys):
    # The head has no GPU; the worker declares one (a logical GPU: Ray schedules on it, torch runs on CPU).
    cluster = ray_cluster({"num_cpus": 1, "num_gpus": 0}, {"num_cpus": 1, "num_gpus": 1})
    worker = next(n for n in cluster.list_all_nodes() if n is not cluster.head_node)
    spec = _spec(tmp_path, str(tmp_path / "class"))
    assert gpu_worker_wanted(spec, cluster.address), "the cluster has a GPU though the trials ask for none"
    plan = build_plan(spec, local=False, address=cluster.address)
    out = capsys.readouterr().out
    assert f"class images: 3 written into {tmp_path / 'class'} (rendered on GPU worker node {worker.node_id})" in out
    assert cluster.head_node.node_id not in out
    assert len(plan.prepared.data.class_examples) == 3
    cfg = plan.train_config({"learning_rate": 1e-3, "rank": 2, "lr_scheduler": "constant"})
    more = ensure_sweep_class_images(cfg.model_copy(update={"num_class_images": 4}), tmp_path / "class", gpu_worker=True)
    assert (more.count, more.node_id) == (1, worker.node_id)
    assert sorted(p.name for p in (tmp_path / "class").glob("*.png"))[-1] == "class_00003.png"


def test_the_dry_run_says_which_class_images_will_be_made(tmp_path):
    from sweeps.dry_run import describe_sweep

    (tmp_path / "class").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "class" / "mine.png")
    text = describe_sweep(_spec(tmp_path, str(tmp_path / "class"), "train.class_sampling={steps: 50}"))
    assert (f"before the trials: 2 of 3 class images missing in {tmp_path / 'class'}; made in-process (on a GPU worker "
            "when the cluster has GPUs) with 50 pndm steps at guidance 7.5") in text
    assert not list((tmp_path / "class").glob("class_*.png")), "a dry run makes nothing"
