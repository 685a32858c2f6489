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
- name: PIPELINE_POSTGRES_USER
  value: {{ .Values.postgres.user | quote }}
- name: PIPELINE_POSTGRES_PASSWORD_FILE
  value: /run/secrets/postgres/password
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
