"""End-to-end proof that ``tests/fake_hub.py`` speaks the Hub protocol well enough for the real clients.

Every Hub interaction runs in a fresh subprocess (``run_hub_script``) because ``huggingface_hub`` reads
``HF_ENDPOINT``/``HF_HUB_OFFLINE`` at import. Pushers and pullers use different ``HF_HOME``s, so every pull
really goes through the server, and the offline step proves the cache written by the pull is self-sufficient.
"""

from __future__ import annotations

import json
from pathlib import Path

from hub_utils import run_hub_script

DEAD_ENDPOINT = "http://127.0.0.1:9"  # discard port: nothing listens, any request would fail fast

TINY_IJEPA = repr(
    dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
)


def test_push_revisions_pull_and_offline(fake_hub: str, tmp_path: Path) -> None:
    repo = "test-org/tiny-ijepa"
    # 1. Push: model (commit A), image processor, then different weights (a later commit). Reference
    #    weights are saved locally so the puller can compare without sharing any in-memory state.
    run_hub_script(
        f"""
        import json, torch
        from huggingface_hub import HfApi
        from safetensors.torch import save_file
        from transformers import IJepaConfig, IJepaModel, ViTImageProcessorPil

        api = HfApi()
        api.create_repo("{repo}")
        config = IJepaConfig(**{TINY_IJEPA})
        torch.manual_seed(0)
        model = IJepaModel(config)
        model.push_to_hub("{repo}", commit_message="first weights")
        sha_a = api.model_info("{repo}").sha
        save_file(model.state_dict(), r"{tmp_path / 'weights_a.safetensors'}")

        processor = ViTImageProcessorPil(size={{"height": 32, "width": 32}},
                                         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
        processor.push_to_hub("{repo}")

        torch.manual_seed(1)
        model_b = IJepaModel(config)
        model_b.push_to_hub("{repo}", commit_message="second weights")
        sha_b = api.model_info("{repo}").sha
        save_file(model_b.state_dict(), r"{tmp_path / 'weights_b.safetensors'}")
        json.dump({{"a": sha_a, "b": sha_b}}, open(r"{tmp_path / 'shas.json'}", "w"))
        """,
        fake_hub,
        tmp_path / "pusher_home",
    )
    shas = json.loads((tmp_path / "shas.json").read_text())
    assert shas["a"] != shas["b"] and all(len(s) == 40 for s in shas.values())

    # 2. Pull in a fresh process and cache: listing, snapshot, latest weights, weights of revision A by sha.
    pull = f"""
        import torch
        from huggingface_hub import HfApi, snapshot_download
        from safetensors.torch import load_file
        from transformers import AutoImageProcessor, AutoModel, IJepaModel

        def same(model, ref):
            sd = model.state_dict()
            return sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)

        ref_a = load_file(r"{tmp_path / 'weights_a.safetensors'}")
        ref_b = load_file(r"{tmp_path / 'weights_b.safetensors'}")
        files = set(HfApi().list_repo_files("{repo}"))
        assert {{"config.json", "model.safetensors", "preprocessor_config.json", "README.md"}} <= files, files
        assert set(HfApi().list_repo_files("{repo}", revision="{shas['a']}")) == files - {{"preprocessor_config.json"}}

        snap = snapshot_download("{repo}")
        assert snap.endswith("{shas['b']}"), snap

        latest = AutoModel.from_pretrained("{repo}")
        assert type(latest) is IJepaModel and same(latest, ref_b)
        first = AutoModel.from_pretrained("{repo}", revision="{shas['a']}")
        assert same(first, ref_a) and not same(first, ref_b)
        main = AutoModel.from_pretrained("{repo}", revision="main")
        assert same(main, ref_b)

        proc = AutoImageProcessor.from_pretrained("{repo}")
        assert proc.size == {{"height": 32, "width": 32}} and list(proc.image_mean) == [0.485, 0.456, 0.406]
        """
    puller_home = tmp_path / "puller_home"
    run_hub_script(pull, fake_hub, puller_home)

    # 3. Offline, dead endpoint, same cache: cached repo loads (latest and by sha); uncached repo -> OSError.
    run_hub_script(
        f"""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoImageProcessor, AutoModel

        ref_a = load_file(r"{tmp_path / 'weights_a.safetensors'}")
        ref_b = load_file(r"{tmp_path / 'weights_b.safetensors'}")
        for revision, ref in (("main", ref_b), ("{shas['a']}", ref_a)):
            sd = AutoModel.from_pretrained("{repo}", revision=revision).state_dict()
            assert all(torch.equal(sd[k], ref[k]) for k in ref), revision
        AutoImageProcessor.from_pretrained("{repo}")
        try:
            AutoModel.from_pretrained("test-org/never-pulled")
        except OSError as e:
            print("expected OSError:", e)
        else:
            raise AssertionError("loading an uncached repo offline should raise OSError")
        """,
        DEAD_ENDPOINT,
        puller_home,
        offline=True,
    )


TOY_CONFIG = '''
from transformers import PreTrainedConfig


class ToyRemoteConfig(PreTrainedConfig):
    model_type = "toy_remote_code"

    def __init__(self, hidden_size: int = 8, **kwargs):
        self.hidden_size = hidden_size
        super().__init__(**kwargs)
'''

TOY_MODELING = '''
import torch
from transformers import PreTrainedModel

from .configuration_toy import ToyRemoteConfig


class ToyRemoteModel(PreTrainedModel):
    config_class = ToyRemoteConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(config.hidden_size, config.hidden_size)
        self.post_init()

    def forward(self, x):
        return self.proj(x)
'''


def test_remote_code_round_trip(fake_hub: str, tmp_path: Path) -> None:
    repo = "test-org/toy-remote-code"
    code_dir = tmp_path / "toy_pkg"
    code_dir.mkdir()
    (code_dir / "__init__.py").write_text("")
    (code_dir / "configuration_toy.py").write_text(TOY_CONFIG)
    (code_dir / "modeling_toy.py").write_text(TOY_MODELING)

    # Push from a process that imports the toy package; register_for_auto_class makes save_pretrained copy
    # the two source files next to the weights and write `auto_map` into config.json.
    run_hub_script(
        f"""
        import torch
        from safetensors.torch import save_file
        from toy_pkg.configuration_toy import ToyRemoteConfig
        from toy_pkg.modeling_toy import ToyRemoteModel

        ToyRemoteConfig.register_for_auto_class()
        ToyRemoteModel.register_for_auto_class("AutoModel")
        model = ToyRemoteModel(ToyRemoteConfig(hidden_size=8))
        model.push_to_hub("{repo}")
        save_file(model.state_dict(), r"{tmp_path / 'toy.safetensors'}")
        """,
        fake_hub,
        tmp_path / "pusher_home",
        cwd=tmp_path,  # toy_pkg importable here only
    )

    # A fresh process (cwd elsewhere: toy_pkg is NOT importable) must fetch and run the pushed code.
    run_hub_script(
        f"""
        import importlib.util, torch
        from huggingface_hub import HfApi
        from safetensors.torch import load_file
        from transformers import AutoModel

        assert importlib.util.find_spec("toy_pkg") is None
        files = set(HfApi().list_repo_files("{repo}"))
        assert {{"configuration_toy.py", "modeling_toy.py", "config.json"}} <= files, files

        for kwargs in ({{}}, {{"trust_remote_code": False}}):
            try:
                AutoModel.from_pretrained("{repo}", **kwargs)
            except ValueError as e:
                assert "trust_remote_code" in str(e)
            else:
                raise AssertionError(f"remote code ran without trust_remote_code=True ({{kwargs}})")

        model = AutoModel.from_pretrained("{repo}", trust_remote_code=True)
        assert type(model).__name__ == "ToyRemoteModel", type(model)
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        assert model.config.model_type == "toy_remote_code"
        ref = load_file(r"{tmp_path / 'toy.safetensors'}")
        assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.items())
        """,
        fake_hub,
        tmp_path / "puller_home",
        cwd=tmp_path / "pusher_home",
    )

    # Offline with a dead endpoint: the cached code and weights are enough.
    run_hub_script(
        f"""
        from transformers import AutoModel
        model = AutoModel.from_pretrained("{repo}", trust_remote_code=True)
        assert type(model).__name__ == "ToyRemoteModel"
        """,
        DEAD_ENDPOINT,
        tmp_path / "puller_home",
        offline=True,
        cwd=tmp_path / "pusher_home",
    )


def test_hub_api_branches_errors_and_log(fake_hub_server, fake_hub: str, tmp_path: Path) -> None:
    """Plain ``HfApi`` calls: branches, history, folder upload/delete, and the Hub's typed 404 errors."""
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("a")
    (folder / "sub" / "b.txt").write_text("b")
    run_hub_script(
        """
        from huggingface_hub import HfApi, hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

        api, repo = HfApi(), "test-org/api-basics"
        assert api.create_repo("no-namespace").repo_id == "fake-user/no-namespace"
        api.create_repo(repo)
        api.create_repo(repo, exist_ok=True)
        first = api.upload_folder(folder_path="folder", repo_id=repo).oid
        again = api.upload_folder(folder_path="folder", repo_id=repo).oid  # unchanged files: no new commit
        assert again == first
        assert [e.path for e in api.list_repo_tree(repo)] == [".gitattributes", "a.txt", "sub"]
        assert api.list_repo_files(repo) == [".gitattributes", "a.txt", "sub/b.txt"]

        api.create_branch(repo, branch="dev", revision=first)
        api.delete_file("sub/b.txt", repo_id=repo)
        assert api.list_repo_files(repo) == [".gitattributes", "a.txt"]
        assert "sub/b.txt" in api.list_repo_files(repo, revision="dev")
        assert {b.name for b in api.list_repo_refs(repo).branches} == {"main", "dev"}
        assert len(api.list_repo_commits(repo)) == 3  # initial commit, upload, delete
        assert open(hf_hub_download(repo, "sub/b.txt", revision=first)).read() == "b"

        for call, error in [
            (lambda: hf_hub_download(repo, "missing.txt"), EntryNotFoundError),
            (lambda: hf_hub_download(repo, "a.txt", revision="no-such-branch"), RevisionNotFoundError),
            (lambda: api.model_info("test-org/does-not-exist"), RepositoryNotFoundError),
        ]:
            try:
                call()
            except error:
                pass
            else:
                raise AssertionError(f"expected {error.__name__}")
        assert api.file_exists(repo, "a.txt") and not api.file_exists(repo, "missing.txt")
        api.delete_repo(repo)
        assert not api.repo_exists(repo)
        """,
        fake_hub,
        tmp_path / "home",
        cwd=tmp_path,
    )
    assert ("POST", "/api/repos/create", 409) in fake_hub_server.log
    assert any(m == "DELETE" and p == "/api/repos/delete" and s == 200 for m, p, s in fake_hub_server.log)
