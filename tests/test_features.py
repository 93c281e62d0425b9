"""Feature extraction, the feature store and the datasets that read it (issue 3)."""
import hashlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import extract_features  # noqa: E402
from tinyfusion.io import feature_store  # noqa: E402
from tinyfusion.errors import TinyFusionError  # noqa: E402
from conftest import torch_threads  # noqa: E402
from tinyfusion.distributed import DistributedContext  # noqa: E402
from tinyfusion.io.image_folder import center_crop_arr, image_folder, list_image_folder, to_unit_range  # noqa: E402
from tinyfusion.study.digits import digits_as_uint8, mnist5k_as_uint8, write_digits_folder  # noqa: E402
from tiny_vae import SD_VAE_CONFIG, TINY_VAE_CONFIG, make_tiny_vae  # noqa: E402

PYTHON = sys.executable
IMAGE_SIZE = 16


def write_random_image_folder(root, images_per_class=(5, 4, 6), seed=0):
    """Random RGB PNGs of assorted non-square sizes (so the BOX halving and the crop both act)."""
    rng = np.random.default_rng(seed)
    for label, count in enumerate(images_per_class):
        folder = os.path.join(root, f"class_{label}")
        os.makedirs(folder)
        for i in range(count):
            height, width = rng.integers(17, 70, size=2)
            pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"img_{i:02d}.png"))
    return root


def extract(data_path, features_path, *extra, vae_path=None):
    argv = ["--data-path", str(data_path), "--features-path", str(features_path), "--image-size", str(IMAGE_SIZE),
            "--num-workers", "0", "--shard-size", "4", "--batch-size", "3", *extra]
    if vae_path is not None:
        argv += ["--vae-path", str(vae_path)]
    extract_features.main(extract_features.parse_args(argv))


def store_arrays(path):
    """(latents, labels, indices) of a finished store, concatenated over its shards."""
    manifest = feature_store.read_manifest(path)
    parts = {"latents": [], "labels": [], "indices": []}
    for record in manifest["shards"]:
        file = os.path.join(path, record["file"])
        tensors, _ = feature_store.read_shard_header(file)
        for name in parts:
            parts[name].append(np.array(feature_store._map_array(file, tensors[name])))
    return tuple(np.concatenate(parts[name]) for name in ("latents", "labels", "indices"))


def folder_digest(path):
    return {name: hashlib.sha256(Path(path, name).read_bytes()).hexdigest() for name in sorted(os.listdir(path))}


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_random_image_folder(str(tmp_path_factory.mktemp("data") / "images"))


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory, images, tiny_vae):
    """One finished extraction (1 process, 1 thread) that several tests compare against."""
    path = tmp_path_factory.mktemp("stores") / "reference"
    with torch_threads(1):  # torchrun gives each of its ranks one thread: same kernels, same bits
        extract(images, path, vae_path=tiny_vae)
    return path


# ---------------------------------------------------------------- images

def test_center_crop_follows_adm_recipe():
    pixels = np.random.default_rng(1).integers(0, 256, size=(40, 64, 3), dtype=np.uint8)  # W=64, H=40
    image = Image.fromarray(pixels)
    # by hand: 40 >= 2*16 -> BOX halve to 32x20; 20 < 32 stops; scale 16/20 -> 26x16; crop x from 5
    expected = image.resize((32, 20), Image.BOX).resize((26, 16), Image.BICUBIC).crop((5, 0, 21, 16))
    assert np.array_equal(np.array(center_crop_arr(image, 16)), np.array(expected))


def test_listing_and_values_match_torchvision(tmp_path):
    from torchvision import datasets, transforms
    root = write_random_image_folder(str(tmp_path / "images"), images_per_class=(2, 3))
    os.makedirs(tmp_path / "images" / "class_1" / "nested")
    Image.new("RGB", (30, 20), (10, 200, 30)).save(tmp_path / "images" / "class_1" / "nested" / "deep.jpg")
    (tmp_path / "images" / "class_0" / "notes.txt").write_text("not an image")
    samples, classes, ignored = list_image_folder(root)
    transform = transforms.Compose([transforms.Lambda(lambda img: center_crop_arr(img, IMAGE_SIZE)),
                                    transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])
    reference = datasets.ImageFolder(root, transform=transform)
    assert samples == reference.samples and classes == reference.classes
    assert ignored == [str(tmp_path / "images" / "class_0" / "notes.txt")]
    ours = image_folder(root, IMAGE_SIZE)
    for index in range(len(ours)):
        x, y = ours[index]
        x_ref, y_ref = reference[index]
        assert y == y_ref and torch.equal(x, x_ref)  # bit-identical to ToTensor + Normalize


def test_unit_range_endpoints():
    values = to_unit_range(torch.tensor([0, 128, 255], dtype=torch.uint8))
    assert values[0] == -1.0 and values[2] == 1.0 and abs(values[1].item() - (128 / 255 * 2 - 1)) < 1e-7


def test_make_digits_writes_the_sklearn_digits(tmp_path):
    out = tmp_path / "digits"
    assert write_digits_folder(str(out)) == 1797
    pixels, labels = digits_as_uint8()
    samples, classes, _ = list_image_folder(str(out))
    assert classes == [str(d) for d in range(10)] and len(samples) == 1797
    assert np.bincount([label for _, label in samples]).tolist() == np.bincount(labels).tolist()
    first_seven = next(path for path, label in samples if label == 7)
    index = int(Path(first_seven).stem)
    assert labels[index] == 7
    assert np.array_equal(np.array(Image.open(first_seven)), pixels[index])
    assert pixels.max() == 255 and pixels.min() == 0  # 0..16 mapped onto the full range
    with pytest.raises(ValueError, match="already exists"):
        write_digits_folder(str(out))


def test_mnist5k_splits_each_class_400_train_100_test(tmp_path):
    images, labels = mnist5k_as_uint8("all")
    train, train_labels = mnist5k_as_uint8("train")
    test, test_labels = mnist5k_as_uint8("test")
    assert images.shape == (5000, 28, 28) and len(train) == 4000 and len(test) == 1000
    assert np.bincount(train_labels).tolist() == [400] * 10 and np.bincount(test_labels).tolist() == [100] * 10
    # the test split's first 3 is the 401st 3 of the file, its train split's last 3 the 400th
    threes = np.flatnonzero(labels == 3)
    assert np.array_equal(test[np.flatnonzero(test_labels == 3)[0]], images[threes[400]])
    assert np.array_equal(train[np.flatnonzero(train_labels == 3)[-1]], images[threes[399]])
    assert not {image.tobytes() for image in train} & {image.tobytes() for image in test}  # no digit in both
    out = tmp_path / "mnist-test"
    assert write_digits_folder(str(out), image_size=16, dataset="mnist5k", split="test") == 1000
    samples, _, _ = list_image_folder(str(out))
    first = np.array(Image.open(samples[0][0]))
    assert first.shape == (16, 16) and samples[0][1] == test_labels[0]
    # shrunk by PIL's bicubic, which averages: the mean brightness is kept within a few levels
    assert abs(first.mean() - test[0].mean()) < 4
    with pytest.raises(ValueError, match="no fixed train/test split"):
        write_digits_folder(str(tmp_path / "x"), split="train")
    assert not (tmp_path / "x").exists()


def test_tiny_vae_is_the_sd_vae_architecture_scaled_down(tiny_vae):
    from diffusers.models import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(tiny_vae)
    for key in ("down_block_types", "up_block_types", "latent_channels", "in_channels", "act_fn"):
        value = vae.config[key]
        assert (list(value) if isinstance(value, (list, tuple)) else value) == SD_VAE_CONFIG[key]
    assert len(vae.config.block_out_channels) == len(SD_VAE_CONFIG["block_out_channels"]) == 4  # 8x down
    with torch.no_grad():
        latent = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
    assert latent.shape == (1, 4, 4, 4)
    assert TINY_VAE_CONFIG["latent_channels"] == 4


# ---------------------------------------------------------------- extraction

def test_latents_are_the_vae_posterior_sample_of_image_and_flip(reference_store, images, tiny_vae):
    """Second path: diffusers' own latent_dist.sample() with the per-image generator, on the
    image read by torchvision's ImageFolder + the original transform."""
    from diffusers.models import AutoencoderKL
    from torchvision import datasets, transforms
    latents, labels, indices = store_arrays(reference_store)
    reference = datasets.ImageFolder(images, transform=transforms.Compose([
        transforms.Lambda(lambda img: center_crop_arr(img, IMAGE_SIZE)), transforms.ToTensor(),
        transforms.Normalize([0.5] * 3, [0.5] * 3)]))
    assert indices.tolist() == list(range(len(reference)))
    assert labels.tolist() == reference.targets
    vae = AutoencoderKL.from_pretrained(tiny_vae).eval()
    for index in (0, 7, len(reference) - 1):
        x, _ = reference[index]
        generator = torch.Generator().manual_seed(feature_store.hash64(0, index) >> 1)
        with torch.no_grad():
            expected = vae.encode(torch.stack([x, x.flip(dims=[2])])).latent_dist.sample(generator=generator) * 0.18215
        assert latents[index].shape == (2, 4, 2, 2)
        np.testing.assert_allclose(latents[index], expected.numpy(), rtol=0, atol=2e-6)
    manifest = feature_store.read_manifest(reference_store)
    assert manifest["class_to_idx"] == reference.class_to_idx and manifest["scale_factor"] == 0.18215
    assert manifest["num_samples"] == len(reference) and manifest["sample_shape"] == [4, 2, 2]
    assert sorted(os.listdir(reference_store)) == ["extraction.json", "manifest.json"] + [
        feature_store.shard_file_name(i) for i in range(4)]  # 15 images / 4 per shard: 2 + 4 files


def test_pixel_space_store_holds_the_images_and_flips(tmp_path, images):
    extract(images, tmp_path / "pixels", "--vae", "none")
    latents, labels, _ = store_arrays(tmp_path / "pixels")
    dataset = image_folder(images, IMAGE_SIZE)
    assert latents.shape == (len(dataset), 2, 3, IMAGE_SIZE, IMAGE_SIZE)
    for index in (0, 9):
        x, y = dataset[index]
        assert np.array_equal(latents[index, 0], x.numpy()) and np.array_equal(latents[index, 1], x.flip(2).numpy())
        assert labels[index] == y
    assert feature_store.read_manifest(tmp_path / "pixels")["scale_factor"] is None


def test_no_flip_store_holds_the_images_alone_and_never_flips(tmp_path, images, reference_store, tiny_vae):
    extract(images, tmp_path / "pixels", "--vae", "none", "--no-flip")
    latents, labels, _ = store_arrays(tmp_path / "pixels")
    dataset = image_folder(images, IMAGE_SIZE)
    assert latents.shape == (len(dataset), 1, 3, IMAGE_SIZE, IMAGE_SIZE)
    always_flip = feature_store.open_feature_dataset(tmp_path / "pixels", flip_prob=1.0)
    for index in (0, 9):
        x, y = dataset[index]
        assert np.array_equal(always_flip[index][0].numpy(), x.numpy()) and labels[index] == y
    # with a VAE the image's latent is the flipped store's first copy, noise included
    with torch_threads(1):
        extract(images, tmp_path / "latents", "--no-flip", vae_path=tiny_vae)
    alone, _, _ = store_arrays(tmp_path / "latents")
    both, _, _ = store_arrays(reference_store)
    # (the VAE sees batches of B images instead of 2B: the same kernels up to float rounding)
    assert np.allclose(alone[:, 0], both[:, 0], rtol=1e-4, atol=1e-5) and not np.allclose(alone[:, 0], both[:, 1])


def test_fp16_store_rounds_the_fp32_values(tmp_path, images, reference_store, tiny_vae):
    with torch_threads(1):
        extract(images, tmp_path / "half", "--store-dtype", "fp16", vae_path=tiny_vae)
    half, _, _ = store_arrays(tmp_path / "half")
    full, _, _ = store_arrays(reference_store)
    assert half.dtype == np.float16 and np.array_equal(half, full.astype(np.float16))


def test_two_ranks_write_the_same_store_as_one(tmp_path, images, tiny_vae, reference_store):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "extract_features.py"), "--data-path", str(images), "--features-path",
               str(tmp_path / "two"), "--image-size", str(IMAGE_SIZE), "--num-workers", "0", "--shard-size", "4",
               "--batch-size", "3", "--vae-path", str(tiny_vae)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "images/s over 2 rank(s)" in result.stdout
    for ours, theirs in zip(store_arrays(tmp_path / "two"), store_arrays(reference_store)):
        assert np.array_equal(ours, theirs)  # same latents, labels and indices, bit for bit
    manifest = feature_store.read_manifest(tmp_path / "two")
    assert [record["rank"] for record in manifest["shards"]] == [0, 1, 0, 1]  # each shard by one rank
    assert len(os.listdir(tmp_path / "two")) == 2 + len(manifest["shards"])
    assert manifest["extraction_id"] == feature_store.read_manifest(reference_store)["extraction_id"]


def test_resume_redoes_missing_truncated_and_corrupted_shards(tmp_path, reference_store, images, tiny_vae):
    path = tmp_path / "killed"
    shutil.copytree(reference_store, path)
    # the state a killed run (plus a bad disk) leaves: no manifest, a temp file, three bad shards
    os.remove(path / "manifest.json")
    os.remove(path / feature_store.shard_file_name(1))
    shard_2 = path / feature_store.shard_file_name(2)
    shard_2.write_bytes(shard_2.read_bytes()[:-10])
    shard_3 = path / feature_store.shard_file_name(3)
    data = bytearray(shard_3.read_bytes())
    data[-20] ^= 0xFF  # a flipped byte inside the latents: only the checksum can tell
    shard_3.write_bytes(bytes(data))
    (path / ".shard-00001.x1y2.tmp.safetensors").write_bytes(b"half a shard")
    with pytest.raises(TinyFusionError, match="unfinished"):
        feature_store.open_feature_dataset(path)
    untouched = os.stat(path / feature_store.shard_file_name(0))
    with pytest.raises(TinyFusionError, match="pass --resume"):
        extract(images, path, vae_path=tiny_vae)
    with torch_threads(1):
        extract(images, path, "--resume", vae_path=tiny_vae)
    for ours, theirs in zip(store_arrays(path), store_arrays(reference_store)):
        assert np.array_equal(ours, theirs)
    again = os.stat(path / feature_store.shard_file_name(0))
    assert (again.st_ino, again.st_mtime_ns) == (untouched.st_ino, untouched.st_mtime_ns)  # kept, not redone
    assert not [name for name in os.listdir(path) if ".tmp" in name]
    shards = [feature_store.shard_file_name(i) for i in range(4)]
    assert [folder_digest(path)[name] for name in shards] == [folder_digest(reference_store)[name] for name in shards]
    finished = {name: os.stat(path / name).st_mtime_ns for name in os.listdir(path)}
    extract(images, path, "--resume", vae_path=tiny_vae)  # complete: a no-op that rewrites nothing
    assert {name: os.stat(path / name).st_mtime_ns for name in os.listdir(path)} == finished


def test_damaged_store_is_refused_by_the_dataset(tmp_path, reference_store):
    path = tmp_path / "damaged"
    shutil.copytree(reference_store, path)
    shard = path / feature_store.shard_file_name(2)
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(TinyFusionError, match="damaged.*--resume"):
        feature_store.open_feature_dataset(path)


def test_bad_inputs_are_one_line_errors_and_overwrite_nothing(tmp_path, images, tiny_vae, reference_store,
                                                              monkeypatch):
    def fails(match, data_path, features_path, *extra, vae_path=tiny_vae):
        with pytest.raises(TinyFusionError, match=match) as error:
            extract(data_path, features_path, *extra, vae_path=vae_path)
        assert "\n" not in str(error.value)

    os.makedirs(tmp_path / "empty")
    fails("no class sub-folders", tmp_path / "empty", tmp_path / "out")
    os.makedirs(tmp_path / "no_images" / "cat")
    (tmp_path / "no_images" / "cat" / "readme.txt").write_text("hello")
    fails("no images", tmp_path / "no_images", tmp_path / "out")
    fails("not divisible by the VAE downsampling factor 8", images, tmp_path / "out", "--image-size", "20")
    fails("has 3 class folders but --num-classes is 2", images, tmp_path / "out", "--num-classes", "2")
    (tmp_path / "a_file").write_text("x")
    fails("is a file", images, tmp_path / "a_file")
    assert not (tmp_path / "out").exists()

    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    fails("`hf download stabilityai/sd-vae-ft-mse --local-dir pretrained/sd-vae-ft-mse`.*--vae-path", images,
          tmp_path / "out",
          "--vae", "mse", vae_path=None)
    assert not (tmp_path / "out").exists()

    before = folder_digest(reference_store)
    fails("different extraction \\(global_seed", images, reference_store, "--global-seed", "1")
    fails("different extraction \\(image_size", images, reference_store, "--image-size", "24", "--vae", "none",
          vae_path=None)
    fails("finished run of this extraction", images, reference_store)
    assert folder_digest(reference_store) == before

    legacy = tmp_path / "legacy"
    os.makedirs(legacy / "imagenet256_features")
    fails("not empty and holds no extraction of ours", images, legacy)
    assert os.listdir(legacy) == ["imagenet256_features"]


def test_unreadable_image_is_skipped_and_logged(tmp_path, tiny_vae, capsys):
    root = write_random_image_folder(str(tmp_path / "images"), images_per_class=(3, 3))
    for name in ("img_01.png", "img_02.png"):  # images 4 and 5: all of shard 1 (4 images per shard)
        (tmp_path / "images" / "class_1" / name).write_bytes(b"this is not a png")
    extract(root, tmp_path / "out", vae_path=tiny_vae)
    assert "skipping" in capsys.readouterr().out
    manifest = feature_store.read_manifest(tmp_path / "out")
    assert manifest["skipped"] == [os.path.join("class_1", f"img_0{i}.png") for i in (1, 2)]
    assert manifest["num_samples"] == 4 and [record["count"] for record in manifest["shards"]] == [4, 0]
    latents, labels, indices = store_arrays(tmp_path / "out")
    assert indices.tolist() == [0, 1, 2, 3] and labels.tolist() == [0, 0, 0, 1] and latents.shape[0] == 4
    dataset = feature_store.open_feature_dataset(tmp_path / "out")
    assert len(dataset) == 4 and dataset[3][1].item() == 1


def test_all_original_extract_flags_parse():
    args = extract_features.parse_args(
        "--data-path d --features-path f --results-dir r --model DiT-XL/2 --image-size 512 --num-classes 1000 "
        "--epochs 3 --global-batch-size 8 --global-seed 4 --vae mse --num-workers 2 --log-every 5 "
        "--ckpt-every 6".split())
    assert (args.image_size, args.vae, args.global_seed, args.features_path) == (512, "mse", 4, "f")
    defaults = extract_features.parse_args(["--data-path", "d"])
    assert (defaults.features_path, defaults.image_size, defaults.vae, defaults.global_seed,
            defaults.num_workers) == ("features", 256, "ema", 0, 4)


@pytest.mark.slow
def test_killed_extraction_resumes_to_the_same_store(tmp_path, tiny_vae):
    root = write_random_image_folder(str(tmp_path / "images"), images_per_class=(30, 30))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    base = [PYTHON, str(REPO / "extract_features.py"), "--data-path", root, "--image-size", str(IMAGE_SIZE),
            "--num-workers", "0", "--shard-size", "2", "--batch-size", "1", "--vae-path", str(tiny_vae)]
    subprocess.run(base + ["--features-path", str(tmp_path / "full")], env=env, check=True, capture_output=True)
    process = subprocess.Popen(base + ["--features-path", str(tmp_path / "killed")], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "killed" / feature_store.shard_file_name(3)).exists():
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "manifest.json").exists(), "extraction finished before it could be killed"
    subprocess.run(base + ["--features-path", str(tmp_path / "killed"), "--resume"], env=env, check=True,
                   capture_output=True)
    for ours, theirs in zip(store_arrays(tmp_path / "killed"), store_arrays(tmp_path / "full")):
        assert np.array_equal(ours, theirs)


# ---------------------------------------------------------------- datasets

def write_original_layout(root, count=12, seed=0):
    rng = np.random.default_rng(seed)
    features, labels = [], []
    os.makedirs(root / "imagenet256_features")
    os.makedirs(root / "imagenet256_labels")
    for i in range(count):
        features.append(rng.standard_normal((2, 4, 4, 4)).astype(np.float32))
        labels.append(np.array([int(rng.integers(0, 7))]))
        np.save(root / "imagenet256_features" / f"{i}.npy", features[-1])
        np.save(root / "imagenet256_labels" / f"{i}.npy", labels[-1])
    return features, labels


def test_original_layout_loads_through_the_same_dataset(tmp_path):
    features, labels = write_original_layout(tmp_path)
    for path in (tmp_path, tmp_path / "imagenet256_features"):
        dataset = feature_store.open_feature_dataset(path, seed=3)
        assert isinstance(dataset, feature_store.FeatureDataset)
        assert len(dataset) == 12 and dataset.sample_shape == (4, 4, 4)
        assert dataset.num_classes == max(int(label[0]) for label in labels) + 1
        assert dataset.metadata["layout"] == "original" and dataset.metadata["image_size"] == 32
        for index in (0, 2, 10, 11):  # numeric order: 10.npy is image 10, not image 2
            x, y = dataset[index]
            copy = 1 if feature_store.hash_uniform(3, 0, index) < 0.5 else 0
            assert torch.equal(x, torch.from_numpy(features[index][copy])) and x.dtype == torch.float32
            assert y.item() == labels[index][0] and y.dtype == torch.int64 and y.shape == ()


def test_store_dataset_items_and_metadata(reference_store):
    latents, labels, _ = store_arrays(reference_store)
    dataset = feature_store.open_feature_dataset(reference_store, seed=5)
    assert len(dataset) == len(labels) and dataset.sample_shape == (4, 2, 2) and dataset.num_classes == 3
    assert dataset.metadata["layout"] == "tinyfusion" and dataset.metadata["image_size"] == IMAGE_SIZE
    assert dataset.metadata["class_to_idx"] == {"class_0": 0, "class_1": 1, "class_2": 2}
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            x, y = dataset[index]
            copy = 1 if feature_store.hash_uniform(5, epoch, index) < 0.5 else 0
            assert np.array_equal(x.numpy(), latents[index, copy]) and y.item() == labels[index]
    never, always = (feature_store.open_feature_dataset(reference_store, flip_prob=p) for p in (0.0, 1.0))
    assert all(np.array_equal(never[i][0].numpy(), latents[i, 0]) for i in range(len(never)))
    assert all(np.array_equal(always[i][0].numpy(), latents[i, 1]) for i in range(len(always)))
    clone = pickle.loads(pickle.dumps(dataset))  # what a DataLoader worker gets
    assert all(torch.equal(clone[i][0], dataset[i][0]) for i in range(len(dataset)))


def test_flip_choice_is_a_fair_coin_per_epoch():
    flips = np.array([[feature_store.hash_uniform(0, epoch, i) < 0.5 for i in range(4000)] for epoch in (0, 1)])
    assert abs(flips.mean() - 0.5) < 0.02  # 8000 draws: 5 sigma is 0.028
    assert 0.45 < (flips[0] != flips[1]).mean() < 0.55  # epochs are independent


def test_loader_is_worker_independent_and_resumes_mid_epoch(reference_store):
    dataset = feature_store.open_feature_dataset(reference_store, seed=1)
    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")

    def epoch_batches(num_workers, epoch, start_batch=0):
        loader, sampler = feature_store.make_loader(dataset, 4, ctx, seed=7, num_workers=num_workers)
        sampler.set_epoch(epoch, start_batch=start_batch)
        return [(x.clone(), y.clone()) for x, y in loader]

    serial = epoch_batches(0, epoch=2)
    assert len(serial) == len(dataset) // 4
    workers = epoch_batches(2, epoch=2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(serial, workers))
    resumed = epoch_batches(0, epoch=2, start_batch=1)
    assert len(resumed) == len(serial) - 1
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(serial[1:], resumed))
    other_epoch = epoch_batches(0, epoch=3)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(serial, other_epoch))


def test_ranks_split_the_samples():
    dataset = list(range(10))
    seen = []
    for rank in (0, 1):
        ctx = DistributedContext(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"), backend="gloo")
        loader, sampler = feature_store.make_loader(dataset, 5, ctx, seed=0, num_workers=0)
        sampler.set_epoch(0)
        seen += [int(v) for batch in loader for v in batch]
        assert feature_store.batches_per_epoch(sampler) == 1
    assert sorted(seen) == list(range(10))
    with pytest.raises(ValueError, match="cannot fill one batch"):
        feature_store.make_loader(dataset, 6, ctx, seed=0, num_workers=0)


def test_missing_features_is_a_one_line_error(tmp_path):
    with pytest.raises(TinyFusionError, match=f"no features found in {tmp_path}; run extract_features.py"):
        feature_store.open_feature_dataset(tmp_path)
