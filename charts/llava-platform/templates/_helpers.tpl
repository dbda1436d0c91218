{{/* Names, labels and the security blocks every pod shares. */}}

{{- define "llava.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "llava.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "llava.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "llava.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels for one component: include with (dict "ctx" $ "component" "mlflow"). */}}
{{- define "llava.selector" -}}
app.kubernetes.io/name: {{ include "llava.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "llava.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag -}}
{{- end -}}

{{- define "llava.gpuImage" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.gpuTag -}}
{{- end -}}

{{- define "llava.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: {{ .readOnly }}
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{- define "llava.mlflowUrl" -}}
{{- printf "http://%s-mlflow.%s.svc:%v" (include "llava.fullname" .) .Release.Namespace .Values.mlflow.port -}}
{{- end -}}

{{/* The S3 endpoint: the configured one, else the in-chart MinIO when enabled, else AWS (empty). */}}
{{- define "llava.s3Endpoint" -}}
{{- if .Values.s3.endpointUrl -}}
{{- .Values.s3.endpointUrl -}}
{{- else if .Values.minio.enabled -}}
{{- printf "http://%s-minio.%s.svc:9000" (include "llava.fullname" .) .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* S3 settings as env vars; credentials only as secretKeyRef. */}}
{{- define "llava.s3Env" -}}
{{- with include "llava.s3Endpoint" . }}
- name: AWS_ENDPOINT_URL_S3
  value: {{ . | quote }}
{{- end }}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.s3.region | quote }}
{{- with .Values.s3.credentialsSecret }}
{{- if .name }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ .name | quote }}, key: {{ .accessKeyIdKey | quote }}}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ .name | quote }}, key: {{ .secretAccessKeyKey | quote }}}
{{- end }}
{{- end }}
{{- end -}}

{{- define "llava.mlflowClientEnv" -}}
- name: MLFLOW_TRACKING_URI
  value: {{ include "llava.mlflowUrl" . | quote }}
{{- if and .Values.mlflow.auth.enabled .Values.mlflow.auth.clientCredentialsSecret }}
- name: MLFLOW_TRACKING_USERNAME
  valueFrom:
    secretKeyRef: {name: {{ .Values.mlflow.auth.clientCredentialsSecret | quote }}, key: MLFLOW_TRACKING_USERNAME}
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ .Values.mlflow.auth.clientCredentialsSecret | quote }}, key: MLFLOW_TRACKING_PASSWORD}
{{- end }}
{{- end -}}

{{/* Namespaces the operator serves. */}}
{{- define "llava.watchNamespaces" -}}
{{- if .Values.operator.watchNamespaces -}}
{{- join "," .Values.operator.watchNamespaces -}}
{{- else -}}
{{- .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/*
A Ray pod template. Args: dict ctx, name (container), image, resources, gpu (int), nodeSelector,
tolerations, head (bool). The root filesystem stays writable: Ray keeps session files, runtime envs
and caches under /tmp and the image's home, which also holds its Python environment.
*/}}
{{- define "llava.rayPod" -}}
{{- $ctx := .ctx -}}
metadata:
  labels:
    {{- include "llava.labels" $ctx | nindent 4 }}
spec:
  automountServiceAccountToken: false
  {{- if $ctx.Values.operator.rayServiceAccount }}
  serviceAccountName: {{ $ctx.Values.operator.rayServiceAccount }}
  {{- end }}
  securityContext:
    {{- toYaml $ctx.Values.podSecurityContext | nindent 4 }}
  {{- with $ctx.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .name }}
      image: {{ .image }}
      imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
      securityContext:
        {{- include "llava.containerSecurityContext" (dict "readOnly" false) | nindent 8 }}
      resources:
        requests:
          {{- toYaml .resources.requests | nindent 10 }}
          {{- if .gpu }}
          nvidia.com/gpu: {{ .gpu }}
          {{- end }}
        limits:
          {{- toYaml .resources.limits | nindent 10 }}
          {{- if .gpu }}
          nvidia.com/gpu: {{ .gpu }}
          {{- end }}
      env:
        {{- include "llava.s3Env" $ctx | nindent 8 }}
        {{- if $ctx.Values.mlflow.enabled }}
        {{- include "llava.mlflowClientEnv" $ctx | nindent 8 }}
        {{- end }}
        {{- if .serveKeys }}
        {{- include "llava.serveKeyEnv" $ctx | nindent 8 }}
        {{- end }}
      {{- if .head }}
      ports:
        - {containerPort: 6379, name: gcs-server}
        - {containerPort: 8265, name: dashboard}
        - {containerPort: 10001, name: client}
        - {containerPort: 8000, name: serve}
      {{- end }}
      volumeMounts:
        - {name: shm, mountPath: /dev/shm}
  volumes:
    - name: shm
      emptyDir: {medium: Memory, sizeLimit: 2Gi}
{{- end -}}

{{/* The serving keys as secretKeyRef env vars (same names as llava_operator.serve_settings). */}}
{{- define "llava.serveKeyEnv" -}}
{{- with .Values.serving.auth }}
- name: LLAVA_API_KEY
  valueFrom:
    secretKeyRef: {name: {{ .apiKeySecret.name | quote }}, key: {{ .apiKeySecret.key | quote }}}
{{- if .adminKeySecret.name }}
- name: LLAVA_ADMIN_KEY
  valueFrom:
    secretKeyRef: {name: {{ .adminKeySecret.name | quote }}, key: {{ .adminKeySecret.key | quote }}}
{{- end }}
{{- end }}
{{- end -}}

{{/*
serveConfigV2 of the chart's RayService: the same `build_app` args as the operator writes
(llava_operator.serve_settings.serve_args; tests/charts/test_serving_values.py compares them).
*/}}
{{- define "llava.serveConfig" -}}
{{- $rs := .Values.rayService -}}
{{- $auth := .Values.serving.auth -}}
{{- $resources := dict "num_cpus" $rs.replica.cpus "num_gpus" $rs.replica.gpus -}}
{{- if $rs.replica.memoryGi }}{{- $_ := set $resources "memory_bytes" (mul $rs.replica.memoryGi 1073741824) -}}{{- end -}}
{{- $model := dict "num_replicas" $rs.numReplicas "max_ongoing_requests" $rs.maxOngoingRequests "resources" $resources "device" $rs.engine.device "dtype" $rs.engine.dtype "max_batch_size" $rs.engine.maxBatchSize "compile_decode" $rs.engine.compileDecode -}}
{{- if $rs.autoscaling.enabled }}{{- $_ := set $model "autoscaling" (dict "min_replicas" $rs.autoscaling.minReplicas "max_replicas" $rs.autoscaling.maxReplicas "target_ongoing_requests" $rs.autoscaling.targetOngoingRequests) -}}{{- end -}}
{{- $authArgs := dict "api_key_env" "LLAVA_API_KEY" -}}
{{- if $auth.adminKeySecret.name }}{{- $_ := set $authArgs "admin_key_env" "LLAVA_ADMIN_KEY" -}}{{- $_ := set $authArgs "reload_any_uri" $auth.reloadAnyUri -}}{{- end -}}
{{- $args := dict "model_uri" (printf "models:/%s@%s" $rs.modelName $rs.alias) "auth" $authArgs "model" $model -}}
{{- $app := dict "name" "llava" "route_prefix" "/" "import_path" "llava_platform.serving.app:build_app" "args" $args -}}
{{- toYaml (dict "applications" (list $app)) -}}
{{- end -}}

{{/* imagePullSecrets as the comma-separated names the operator reads. */}}
{{- define "llava.pullSecretNames" -}}
{{- $names := list -}}
{{- range .Values.imagePullSecrets }}{{- $names = append $names .name -}}{{- end -}}
{{- join "," $names -}}
{{- end -}}

{{- define "llava.rayAuthOptions" -}}
authOptions:
  mode: token
  {{- if .Values.ray.auth.tokenSecret }}
  secretName: {{ .Values.ray.auth.tokenSecret }}
  {{- end }}
{{- end -}}
