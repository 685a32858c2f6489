{{- define "pipeline.name" -}}{{ .Release.Name }}{{- end -}}

{{- define "pipeline.labels" -}}
app.kubernetes.io/name: event-pipeline
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "pipeline.selector" -}}
app.kubernetes.io/name: event-pipeline
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The settings every process shares: the database, secrets from mounted files. */}}
{{- define "pipeline.env" -}}
- name: PIPELINE_ENV
  value: {{ .Values.env | quote }}
- name: PIPELINE_NAMESPACE
  value: {{ .Values.namespace | quote }}
- name: PIPELINE_LOG_FORMAT
  value: json
- name: PIPELINE_POSTGRES_HOST
  value: {{ include "pipeline.postgresHost" . | quote }}
- name: PIPELINE_POSTGRES_PORT
  value: {{ .Values.postgres.port | quote }}
- name: PIPELINE_POSTGRES_DBNAME
  value: {{ .Values.postgres.dbname | quote }}
- name: PIPELINE_POSTGRES_ROLES_PREFIX
  value: {{ .Values.postgres.rolesPrefix | quote }}
{{- end -}}

{{/* Log in to PostgreSQL as role `role` (writer, projector, api: made by `pipeline db
migrate`), its password from the Secret mounted at /run/secrets/postgres. */}}
{{- define "pipeline.postgresRole" -}}
- name: PIPELINE_POSTGRES_USER
  value: {{ printf "%s_%s" .root.Values.postgres.rolesPrefix .role | quote }}
- name: PIPELINE_POSTGRES_PASSWORD_FILE
  value: /run/secrets/postgres/password
{{- end -}}

{{/* What the streams and consumers are made of: the streams Job applies them, the worker
checks them at start and refuses to run on a missing or drifted one. Both read these. */}}
{{- define "pipeline.streamsEnv" -}}
- name: PIPELINE_DOMAINS
  value: {{ .Values.worker.domains | quote }}
- name: PIPELINE_NATS_URL
  value: {{ include "pipeline.natsUrl" . | quote }}
{{- if .Values.nats.enabled }}
# The streams on every server of the NATS in the release (at most 5, JetStream's limit).
- name: PIPELINE_STREAM_REPLICAS
  value: {{ min 5 (int (include "pipeline.natsServers" .)) | quote }}
{{- end }}
{{- if .Values.nats.caSecret }}
- name: PIPELINE_NATS_TLS_CA_FILE
  value: /run/secrets/nats-ca/ca.pem
{{- end }}
{{- end -}}

{{/* Connect to NATS as `user` (a value such as .Values.nats.incidents: user and
passwordSecret), its password from the Secret mounted at /run/secrets/nats and the CA at
/run/secrets/nats-ca (volumes "nats" and "nats-ca": pipeline.natsVolumes). */}}
{{- define "pipeline.natsUser" -}}
- name: PIPELINE_NATS_URL
  value: {{ include "pipeline.natsUrl" .root | quote }}
{{- if .root.Values.nats.caSecret }}
- name: PIPELINE_NATS_TLS_CA_FILE
  value: /run/secrets/nats-ca/ca.pem
{{- end }}
- name: PIPELINE_NATS_USER
  value: {{ .user.user | quote }}
- name: PIPELINE_NATS_PASSWORD_FILE
  value: /run/secrets/nats/password
{{- end -}}

{{/* The volumes pipeline.natsUser reads. */}}
{{- define "pipeline.natsVolumes" -}}
- name: nats
  secret: {secretName: {{ .user.passwordSecret }}}
{{- if .root.Values.nats.caSecret }}
- name: nats-ca
  secret: {secretName: {{ .root.Values.nats.caSecret }}}
{{- end }}
{{- end -}}

{{/* Their mounts. */}}
{{- define "pipeline.natsMounts" -}}
- {name: nats, mountPath: /run/secrets/nats, readOnly: true}
{{- if .Values.nats.caSecret }}
- {name: nats-ca, mountPath: /run/secrets/nats-ca, readOnly: true}
{{- end }}
{{- end -}}

{{/* The port of nats.url (4222 when it names none), or of the NATS in the release. */}}
{{- define "pipeline.natsPort" -}}
{{- if .Values.nats.enabled -}}
{{ int .Values.nats.config.nats.port }}
{{- else -}}
{{- $host := (urlParse .Values.nats.url).host -}}
{{- if contains ":" $host }}{{ last (splitList ":" $host) }}{{ else }}4222{{ end -}}
{{- end -}}
{{- end -}}

{{/* The name the NATS chart gives its resources (its "nats.fullname"). */}}
{{- define "pipeline.natsFullname" -}}
{{- $nats := .Values.nats -}}
{{- if $nats.fullnameOverride -}}
{{ $nats.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else -}}
{{- $name := default "nats" $nats.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else -}}
{{ printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The labels the NATS chart selects its servers' pods by (its "nats.selectorLabels"). */}}
{{- define "pipeline.natsSelector" -}}
app.kubernetes.io/name: {{ default "nats" .Values.nats.nameOverride | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: nats
{{- end -}}

{{/* How many servers the NATS in the release has: its cluster's replicas, or one. */}}
{{- define "pipeline.natsServers" -}}
{{- if .Values.nats.config.cluster.enabled }}{{ int .Values.nats.config.cluster.replicas }}{{ else }}1{{ end -}}
{{- end -}}

{{/* PIPELINE_NATS_URL: nats.url, or with the NATS in the release each of its servers
(pod i of the StatefulSet through the headless Service), comma-separated, so a client
reaches the cluster while any one of them answers. */}}
{{- define "pipeline.natsUrl" -}}
{{- if .Values.nats.enabled -}}
{{- $config := .Values.nats.config -}}
{{- $full := include "pipeline.natsFullname" . -}}
{{- $tls := false -}}
{{- with $config.nats.tls }}{{ $tls = .enabled }}{{ end -}}
{{- $scheme := ternary "tls" "nats" (eq $tls true) -}}
{{- $servers := int (include "pipeline.natsServers" .) -}}
{{- $urls := list -}}
{{- range $i := until $servers -}}
{{- $urls = append $urls (printf "%s://%s-%d.%s-headless.%s.svc:%d" $scheme $full $i $full $.Release.Namespace (int $config.nats.port)) -}}
{{- end -}}
{{ join "," $urls }}
{{- else -}}
{{ .Values.nats.url }}
{{- end -}}
{{- end -}}

{{/* The CloudNativePG Cluster's name. */}}
{{- define "pipeline.cnpgName" -}}{{ .Release.Name }}-postgres{{- end -}}

{{/* PIPELINE_POSTGRES_HOST: postgres.host, or the CloudNativePG Cluster's read-write
Service (the primary, wherever it runs). */}}
{{- define "pipeline.postgresHost" -}}
{{- if .Values.postgresql.cloudnativepg.enabled -}}
{{ include "pipeline.cnpgName" . }}-rw
{{- else -}}
{{ .Values.postgres.host }}
{{- end -}}
{{- end -}}

{{- define "pipeline.probes" -}}
startupProbe:
  httpGet: {path: /healthz, port: {{ .port }}}
  periodSeconds: 5
  failureThreshold: 60
livenessProbe:
  httpGet: {path: /healthz, port: {{ .port }}}
  periodSeconds: 10
readinessProbe:
  httpGet: {path: /readyz, port: {{ .port }}}
  periodSeconds: 5
{{- end -}}

{{- define "pipeline.securityContext" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: {drop: ["ALL"]}
{{- end -}}

{{/* The name of worker process i's metrics port: `metrics` for the first, as every
process's, then `metrics-1`, `metrics-2`... (its number is 9108 + i). */}}
{{- define "pipeline.workerPort" -}}{{ if . }}metrics-{{ . }}{{ else }}metrics{{ end }}{{- end -}}

{{/* Ray's token authentication on a Ray node: the token from the mounted secret. */}}
{{- define "pipeline.rayAuthEnv" -}}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN_PATH
  value: /run/secrets/ray/token
{{- end -}}

{{/* When the migration and streams Jobs run: before the install's resources, or after
them where the servers they talk to are among them (templates/hooks.yaml). */}}
{{- define "pipeline.hookEvents" -}}
{{- if or .Values.nats.enabled .Values.postgresql.cloudnativepg.enabled -}}
post-install,pre-upgrade
{{- else -}}
pre-install,pre-upgrade
{{- end -}}
{{- end -}}

{{/* Whether this chart runs the NATS exporter: enabled, and NATS not in the release (whose
chart runs one beside each server, nats.promExporter). "true" or "false". */}}
{{- define "pipeline.natsExporter" -}}
{{- and .Values.natsExporter.enabled (not .Values.nats.enabled) -}}
{{- end -}}

{{/* Where KEDA reads the consumers' pending messages: keda.monitoringEndpoint, or the NATS
in the release's headless Service (a clustered server's scaler asks the consumer's
leader as <server name>.<endpoint>: the servers are named after their pods). */}}
{{- define "pipeline.kedaMonitoringEndpoint" -}}
{{- if .Values.nats.enabled -}}
{{- $full := include "pipeline.natsFullname" . -}}
{{ printf "%s-headless.%s.svc.cluster.local:%d" $full .Release.Namespace (int .Values.nats.config.monitor.port) }}
{{- else -}}
{{ .Values.keda.monitoringEndpoint }}
{{- end -}}
{{- end -}}
