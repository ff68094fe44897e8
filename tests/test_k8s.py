"""The Kubernetes manifests in k8s/: each validates offline against the Kubernetes schemas (core
resources whole, and the job and pod templates inside the Kubeflow resources) and uses only the
Kubeflow resources' documented fields. Two launchers given exactly the variables each operator sets,
on loopback, train the same weights as one torchrun with 2 processes, and so do two lone processes
(one per pod, no torchrun) placed by distrain's own detection; SIGTERM to the pods, as a pod
deletion, drain or Kueue preemption sends it, leaves a checkpoint and the exit code the manifests
act on (3), and the relaunch of the same pods resumes bitwise."""
import socket
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from conftest import CONFIGS, ROOT, clean_env, final_weights, run_train

K8S = ROOT / "k8s"
SCHEMA_VERSION = kubernetes_validate.latest_version()
TRAIN = ["train.epochs=null", "train.max_steps=40", "train.log_every=10", "train.eval_every=20",
         "checkpoint.every_steps=10", "model.name=tests.pods:stop_pod_mlp", "model.hidden=[32,32]"]


def documents(name: str) -> list[dict]:
    return list(yaml.safe_load_all((K8S / name).read_text()))


def validate_core(resource: dict) -> None:
    kubernetes_validate.validate(resource, SCHEMA_VERSION, strict=True)  # strict: unknown fields are errors


def validate_pod_template(template: dict) -> None:
    validate_core({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template})


def test_core_resources_validate():
    resources = documents("pvc.yaml") + documents("indexed-job.yaml")
    assert [r["kind"] for r in resources] == ["PersistentVolumeClaim", "Service", "Job"]
    for resource in resources:
        validate_core(resource)


def test_the_validation_catches_a_misspelt_field():
    job = documents("indexed-job.yaml")[1]
    job["spec"]["template"]["spec"]["terminationGracePeriod"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(job)


# The fields of the Kubeflow resources these manifests use, as the projects document them
# (trainer.kubeflow.org/v1alpha1 TrainingRuntime and TrainJob, kubeflow.org/v1 PyTorchJob,
# jobset.x-k8s.io/v1alpha2 JobSetSpec); `*` is any key of a map, `[]` any item of a list.
DOCUMENTED = {
    "TrainingRuntime": {
        "apiVersion", "kind", "metadata", "metadata.name", "metadata.labels", "metadata.labels.*", "spec",
        "spec.mlPolicy", "spec.mlPolicy.numNodes", "spec.mlPolicy.torch", "spec.mlPolicy.torch.numProcPerNode",
        "spec.template", "spec.template.spec", "spec.template.spec.failurePolicy",
        "spec.template.spec.failurePolicy.maxRestarts", "spec.template.spec.failurePolicy.restartStrategy",
        "spec.template.spec.failurePolicy.rules", "spec.template.spec.failurePolicy.rules[].name",
        "spec.template.spec.failurePolicy.rules[].action",
        "spec.template.spec.failurePolicy.rules[].onJobFailureReasons",
        "spec.template.spec.replicatedJobs", "spec.template.spec.replicatedJobs[].name",
        "spec.template.spec.replicatedJobs[].template",  # a batch/v1 JobTemplateSpec: validated by the schema
    },
    "TrainJob": {
        "apiVersion", "kind", "metadata", "metadata.name", "spec", "spec.runtimeRef", "spec.runtimeRef.name",
        "spec.runtimeRef.kind", "spec.trainer", "spec.trainer.numNodes", "spec.trainer.args",
        "spec.trainer.resourcesPerNode",  # a core ResourceRequirements
    },
    "PyTorchJob": {
        "apiVersion", "kind", "metadata", "metadata.name", "spec", "spec.nprocPerNode", "spec.runPolicy",
        "spec.runPolicy.backoffLimit", "spec.runPolicy.cleanPodPolicy", "spec.pytorchReplicaSpecs",
        "spec.pytorchReplicaSpecs.*", "spec.pytorchReplicaSpecs.*.replicas", "spec.pytorchReplicaSpecs.*.restartPolicy",
        "spec.pytorchReplicaSpecs.*.template",  # a core PodTemplateSpec: validated by the schema
    },
}
OPAQUE = {"spec.template.spec.replicatedJobs[].template", "spec.trainer.resourcesPerNode",
          "spec.pytorchReplicaSpecs.*.template"}


def field_paths(node, kind: str, prefix: str = ""):
    """Every field path of `node`, maps of names written as `*` where the kind's schema has one."""
    if prefix in OPAQUE or not isinstance(node, (dict, list)):
        return
    if isinstance(node, list):
        if node and isinstance(node[0], dict):
            for item in node:
                yield from field_paths(item, kind, f"{prefix}[]")
        return
    for key, value in node.items():
        wildcard = f"{prefix}.*" if prefix else "*"
        path = wildcard if wildcard in DOCUMENTED[kind] else (f"{prefix}.{key}" if prefix else key)
        yield path
        yield from field_paths(value, kind, path)


@pytest.mark.parametrize("name", ["trainjob.yaml", "pytorchjob.yaml"])
def test_kubeflow_resources_use_only_documented_fields_and_valid_templates(name):
    for resource in documents(name):
        kind = resource["kind"]
        undocumented = set(field_paths(resource, kind)) - DOCUMENTED[kind]
        assert not undocumented, f"{kind}: {sorted(undocumented)}"
        if kind == "TrainingRuntime":
            for replicated in resource["spec"]["template"]["spec"]["replicatedJobs"]:
                validate_core({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "t"},
                               "spec": replicated["template"]["spec"]})
        if kind == "PyTorchJob":
            for replica in resource["spec"]["pytorchReplicaSpecs"].values():
                validate_pod_template(replica["template"])
                assert replica["template"]["spec"]["containers"][0]["name"] == "pytorch"


def test_every_manifest_gives_time_to_checkpoint_and_asks_for_it_on_sigterm():
    pods = [documents("indexed-job.yaml")[1]["spec"]["template"], trainjob_pod_template(documents("trainjob.yaml")[0]),
            *(r["template"] for r in documents("pytorchjob.yaml")[0]["spec"]["pytorchReplicaSpecs"].values())]
    args = [*documents("indexed-job.yaml")[1]["spec"]["template"]["spec"]["containers"][0]["args"],
            *documents("trainjob.yaml")[1]["spec"]["trainer"]["args"]]
    for pod in pods:
        grace = pod["spec"]["terminationGracePeriodSeconds"]
        container = pod["spec"]["containers"][0]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert container["command"] == ["python", "-m", "distrain.launcher"]
        assert 0 < int(env["PET_SHUTDOWN_TIMEOUT"]) < grace  # torchrun gives its workers time before the kill
        assert any(v["name"] == "runs" and v["persistentVolumeClaim"]["claimName"] == "distrain-runs"
                   for v in pod["spec"]["volumes"])
    assert args.count("checkpoint.preempt_signals=[SIGTERM]") == 2


def trainjob_pod_template(runtime: dict) -> dict:
    return runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainjob_pods(port: int) -> list[tuple[list[str], dict]]:
    """Each node's command and the variables Kubeflow Trainer sets (the torch plugin's PET_*, the
    Indexed Job's completion index); the master is node 0 on loopback, one CPU process per node."""
    runtime, job = documents("trainjob.yaml")
    container = trainjob_pod_template(runtime)["spec"]["containers"][0]
    command = container["command"] + job["spec"]["trainer"]["args"]
    nodes = job["spec"]["trainer"]["numNodes"]
    return [(command, {**{e["name"]: e["value"] for e in container["env"]}, "PET_NNODES": str(nodes),
                       "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": str(i), "PET_MASTER_ADDR": "127.0.0.1",
                       "PET_MASTER_PORT": str(port), "JOB_COMPLETION_INDEX": str(i)}) for i in range(nodes)]


def pytorchjob_pods(port: int) -> list[tuple[list[str], dict]]:
    """The Training Operator's variables: MASTER_*, WORLD_SIZE = replicas x processes, RANK = the pod's
    index, and PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK."""
    specs = documents("pytorchjob.yaml")[0]["spec"]["pytorchReplicaSpecs"]
    pods = [specs["Master"]] + [specs["Worker"]] * specs["Worker"]["replicas"]
    pods_out = []
    for i, spec in enumerate(pods):
        container = spec["template"]["spec"]["containers"][0]
        pods_out.append((container["command"] + container["args"], {
            **{e["name"]: e["value"] for e in container["env"]}, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "WORLD_SIZE": str(len(pods)), "RANK": str(i), "PET_NNODES": str(len(pods)), "PET_NPROC_PER_NODE": "1",
            "PET_NODE_RANK": str(i)}))
    return pods_out


def indexed_job_pods(port: int) -> list[tuple[list[str], dict]]:
    """The manifest's own variables (the first pod's Service name replaced by loopback) and the
    completion index Kubernetes sets in each pod of an Indexed Job."""
    job = documents("indexed-job.yaml")[1]
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MASTER_ADDR"] == f"{job['metadata']['name']}-0.{job['spec']['template']['spec']['subdomain']}"
    env.update(NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return [(container["command"] + container["args"], {**env, "JOB_COMPLETION_INDEX": str(i)})
            for i in range(job["spec"]["completions"])]


PLATFORMS = {"kubeflow": trainjob_pods, "pytorchjob": pytorchjob_pods, "indexed-job": indexed_job_pods}


def start_pods(pods, overrides):
    return [subprocess.Popen([sys.executable if c == "python" else c for c in command] + [str(o) for o in overrides],
                             cwd=ROOT, env=clean_env(**env, GLOO_SOCKET_IFNAME="lo"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
            for command, env in pods]


def finish(pods) -> tuple[list[int], list[str]]:
    outputs = [p.communicate(timeout=240)[0] for p in pods]
    return [p.returncode for p in pods], outputs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    run_train(["--config", CONFIGS / "digits_mlp.yaml", *TRAIN, f"run.dir={run}"], nproc=2)
    return final_weights(run)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_two_nodes_with_the_operators_variables_match_one_torchrun(platform, reference, tmp_path):
    run = tmp_path / "run"
    codes, outputs = finish(start_pods(PLATFORMS[platform](free_port()), [*TRAIN, f"run.dir={run}"]))
    assert codes == [0, 0], outputs
    assert f"ddp on 2 process(es) ({platform})" in (run / "logs" / "rank1.log").read_text()
    ours = final_weights(run)
    assert all(ours[k].equal(reference[k]) for k in reference)


@pytest.mark.parametrize("platform", ["kubeflow", "indexed-job"])
def test_one_process_per_pod_without_torchrun_is_placed_by_the_platforms_variables(platform, reference, tmp_path):
    run = tmp_path / "run"
    # the pods' own command with distrain.train in place of the launcher
    pods = [(["python", "-m", "distrain.train", *command[3:]], env)
            for command, env in PLATFORMS[platform](free_port())]
    codes, outputs = finish(start_pods(pods, [*TRAIN, f"run.dir={run}"]))
    assert codes == [0, 0], outputs
    assert f"ddp on 2 process(es) ({platform})" in (run / "logs" / "rank1.log").read_text()
    ours = final_weights(run)
    assert all(ours[k].equal(reference[k]) for k in reference)


@pytest.mark.parametrize("platform, signalled", [("kubeflow", [0, 1]), ("indexed-job", [1])],
                         ids=["every-pod-deleted", "one-pod-drained"])
def test_sigterm_to_the_pods_checkpoints_exits_3_and_the_relaunch_resumes_bitwise(platform, signalled, reference,
                                                                                    tmp_path):
    run, port = tmp_path / "run", free_port()
    # at its 13th step, rank r sends SIGTERM to its pod's main process (the launcher, running torchrun)
    overrides = [*TRAIN, f"run.dir={run}", "model.at=12", f"model.ranks={signalled}",
                 f"model.marker={tmp_path / 'sent'}"]
    codes, outputs = finish(start_pods(PLATFORMS[platform](port), overrides))
    assert codes == [3, 3], outputs  # what the manifests' failure policies restart on
    step = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert 13 <= step < 40
    for rank in (0, 1):
        assert f"preemption signal: checkpointing at step {step}" in (run / "logs" / f"rank{rank}.log").read_text()
    codes, outputs = finish(start_pods(PLATFORMS[platform](free_port()), overrides))
    assert codes == [0, 0], outputs
    assert f"step_{step:08d}" in (run / "logs" / "rank0.log").read_text().split("resumed from", 1)[1][:200]
    ours = final_weights(run)
    assert all(ours[k].equal(reference[k]) for k in reference), "the preempted run differs from an uninterrupted one"


def test_a_world_size_that_does_not_split_the_batch_exits_2_with_one_line(tmp_path):
    command, env = indexed_job_pods(free_port())[0]
    env["NNODES"] = "3"  # 3 nodes x 1 process: the batch of 64 does not split
    proc = subprocess.run([sys.executable if c == "python" else c for c in command] + [f"run.dir={tmp_path / 'run'}"],
                          cwd=ROOT, env=clean_env(**env), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "distrain: error: config key 'data.global_batch_size': 64 is not divisible by the world size 3"]
    assert not (tmp_path / "run").exists()
