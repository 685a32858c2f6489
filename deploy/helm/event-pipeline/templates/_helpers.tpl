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
  value: {{ .Values.postgres.host | quote }}
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
  value: {{ .Values.nats.url | quote }}
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
  value: {{ .root.Values.nats.url | quote }}
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

{{/* The port of nats.url (4222 when it names none). */}}
{{- define "pipeline.natsPort" -}}
{{- $host := (urlParse .Values.nats.url).host -}}
{{- if contains ":" $host }}{{ last (splitList ":" $host) }}{{ else }}4222{{ end -}}
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
