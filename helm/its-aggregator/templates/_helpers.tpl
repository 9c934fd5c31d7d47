{{/* Chart name, truncated to the 63 characters Kubernetes names allow. */}}
{{- define "its-aggregator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: release-chart unless the release name already contains it. */}}
{{- define "its-aggregator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "its-aggregator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "its-aggregator.labels" -}}
helm.sh/chart: {{ include "its-aggregator.chart" . }}
{{ include "its-aggregator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "its-aggregator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "its-aggregator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* "true" when the events go to SQLite on a volume (no PostgreSQL URL given), else empty. */}}
{{- define "its-aggregator.sqlite" -}}
{{- if and (not .Values.database.urlSecret.name) (not (hasPrefix "postgres" (default "" .Values.database.url))) -}}
true
{{- end -}}
{{- end }}

{{/* The database_url written into aggregator.toml. */}}
{{- define "its-aggregator.databaseUrl" -}}
{{- default "sqlite:///var/lib/its-aggregator/events.db" .Values.database.url -}}
{{- end }}

{{/* Name of the claim holding the SQLite database. */}}
{{- define "its-aggregator.claimName" -}}
{{- default (printf "%s-data" (include "its-aggregator.fullname" .)) .Values.persistence.existingClaim -}}
{{- end }}

{{/*
An exec probe fetching http://127.0.0.1:<http.port><path> with probes.command.
Called with (list $ <probe values>).
*/}}
{{- define "its-aggregator.probe" -}}
{{- $root := index . 0 -}}
{{- $p := index . 1 -}}
exec:
  command:
{{- range $root.Values.probes.command }}
    - {{ . | quote }}
{{- end }}
    - {{ printf "http://127.0.0.1:%d%s" (int $root.Values.http.port) $p.path | quote }}
{{- with omit $p "enabled" "path" }}
{{ toYaml . }}
{{- end }}
{{- end }}
