"""A test-side stand-in for the KubeRay controller: runs what the operator writes on a local Ray head.

For every RayJob in the (kmock) API it submits the entrypoint with `ray job submit` to a loopback
Ray head, with the job's `runtimeEnvYAML` variables plus the env of the RayJob's head container
(secretKeyRefs resolved from the test's Secrets, as the kubelet would), and writes the RayJob status
back the way KubeRay does (jobDeploymentStatus / jobStatus / jobId / message). For a RayService it
deploys the `serveConfigV2` on the same head through the Serve REST API (what `serve deploy` calls), with the
serving pods' env (the API key from its Secret) added to the application's runtime env, and marks
the RayService Ready once the application is RUNNING.

Not emulated: pods, scheduling, images, the job submitter pod, token auth between Ray processes,
the per-RayJob cluster (every job runs on the one shared head).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

RAY = ("ray.io", "v1")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class KubeRayStandIn:
    def __init__(self, api, namespace: str, dashboard: str, token: str, secrets: dict[str, dict[str, str]],
                 serve_port: int, workdir: Path) -> None:
        self.api, self.ns, self.dashboard, self.token = api, namespace, dashboard, token
        self.http = httpx.Client(base_url=dashboard, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        self.secrets, self.serve_port, self.workdir = secrets, serve_port, workdir
        self.submitted: dict[str, str] = {}  # RayJob name -> Ray submission id
        self.finished: dict[str, str] = {}  # RayJob name -> final Ray job status
        self.deployed: dict[str, str] = {}  # RayService name -> serveConfigV2 it runs
        self.errors: list[str] = []
        self.transient: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kuberay-standin", daemon=True)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> KubeRayStandIn:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except httpx.TransportError as err:  # a busy dashboard refusing a poll: try again next tick
                self.transient.append(f"{type(err).__name__}: {err}")
            except Exception as err:  # reported by the test instead of dying silently in the thread
                self.errors.append(f"{type(err).__name__}: {err}")
            self._stop.wait(0.5)

    def _tick(self) -> None:
        for job in self._list("rayjobs"):
            name = job["metadata"]["name"]
            if name not in self.submitted:
                self._submit(job)
            elif name not in self.finished:
                self._poll(name)
        for service in self._list("rayservices"):
            config = service["spec"]["serveConfigV2"]
            if self.deployed.get(service["metadata"]["name"]) != config:
                self._deploy(service)
            else:
                self._serve_status(service["metadata"]["name"])

    def _list(self, plural: str) -> list[dict]:
        return self.api.list_namespaced_custom_object(*RAY, self.ns, plural)["items"]

    def _status(self, plural: str, name: str, status: dict) -> None:
        self.api.patch_namespaced_custom_object_status(*RAY, self.ns, plural, name, {"status": status})

    # -- pods' env as the kubelet would give it ------------------------------------------------
    def pod_env(self, cluster: dict) -> dict[str, str]:
        container = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
        env: dict[str, str] = {}
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = item["value"]
            else:
                ref = item["valueFrom"]["secretKeyRef"]
                env[item["name"]] = self.secrets[ref["name"]][ref["key"]]
        return env

    # -- RayJobs -------------------------------------------------------------------------------
    def _submit(self, job: dict) -> None:
        name, spec = job["metadata"]["name"], job["spec"]
        env = {**self.pod_env(spec["rayClusterSpec"]), **yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]}
        submission = f"{name}-{len(self.submitted)}"
        ray_bin = str(Path(sys.executable).with_name("ray"))
        proc = subprocess.run([ray_bin, "job", "submit", "--address", self.dashboard, "--submission-id", submission,
                               "--runtime-env-json", json.dumps({"env_vars": env}), "--no-wait", "--",
                               # the CLI quotes each argument; KubeRay hands the entrypoint to a shell
                               "sh", "-c", spec["entrypoint"]], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token})
        self.submitted[name] = submission
        if proc.returncode != 0:
            self.finished[name] = "FAILED"
            self._status("rayjobs", name, {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED",
                                           "message": f"ray job submit: {proc.stderr[-500:]}"})
            return
        self._status("rayjobs", name, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "jobId": submission})

    def _poll(self, name: str) -> None:
        submission = self.submitted[name]
        info = self.http.get(f"/api/jobs/{submission}").json()
        status = info["status"]
        if status not in TERMINAL:
            return
        self.finished[name] = status
        logs = self.http.get(f"/api/jobs/{submission}/logs").json().get("logs", "")
        (self.workdir / f"{name}.log").write_text(logs)
        message = info.get("message") or ""
        if status != "SUCCEEDED":
            message = f"{message}\n{logs[-1500:]}"
        self._status("rayjobs", name, {"jobDeploymentStatus": "Complete", "jobStatus": status,
                                       "jobId": submission, "message": message[-2000:]})

    # -- RayService ----------------------------------------------------------------------------
    def _deploy(self, service: dict) -> None:
        name, spec = service["metadata"]["name"], service["spec"]
        config: dict[str, Any] = yaml.safe_load(spec["serveConfigV2"])
        pod_env = self.pod_env(spec["rayClusterConfig"])
        for app in config["applications"]:
            runtime_env = app.setdefault("runtime_env", {})
            runtime_env["env_vars"] = {**pod_env, **runtime_env.get("env_vars", {})}
        config["http_options"] = {"host": "127.0.0.1", "port": self.serve_port}
        resp = self.http.put("/api/serve/applications/", json=config)
        resp.raise_for_status()
        self.deployed[name] = spec["serveConfigV2"]

    def _serve_status(self, name: str) -> None:
        apps = self.http.get("/api/serve/applications/").json().get("applications", {})
        statuses = {a.get("status") for a in apps.values()}
        if statuses == {"RUNNING"}:
            self._status("rayservices", name, {"serviceStatus": "Running", "conditions": [
                {"type": "Ready", "status": "True", "reason": "ServeApplicationsRunning", "message": "",
                 "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]})
        elif "DEPLOY_FAILED" in statuses:
            self.errors.append(f"serve deploy failed: {json.dumps(apps)[-2000:]}")
