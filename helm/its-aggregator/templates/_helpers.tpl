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

{{/* "true" when the aggregator serves HTTPS itself (http.tls.secretName set), else empty. */}}
{{- define "its-aggregator.tls" -}}
{{- if dig "tls" "secretName" "" .Values.http -}}
true
{{- end -}}
{{- end }}

{{/* Where the http.tls.secretName Secret is mounted (not under the ConfigMap's read-only mount). */}}
{{- define "its-aggregator.tlsDir" -}}
/etc/its-aggregator-tls
{{- end }}

{{/*
[http] trusted_proxies as a TOML array: http.trustedProxies, plus 127.0.0.1 when a proxy sidecar
is in front of the loopback listener (httpService enabled without TLS).
*/}}
{{- define "its-aggregator.trustedProxies" -}}
{{- $proxies := list -}}
{{- if and .Values.httpService.enabled (not (include "its-aggregator.tls" .)) -}}
{{- $proxies = append $proxies "127.0.0.1" -}}
{{- end -}}
{{- range .Values.http.trustedProxies -}}
{{- $proxies = append $proxies (toString .) -}}
{{- end -}}
{{- $proxies | uniq | toJson -}}
{{- end }}

{{/*
A probe on <path> of the HTTP API. Called with (list $ <probe values>).
With TLS: httpGet over HTTPS on the pod's https port. Without: an exec probe fetching
http://127.0.0.1:<http.port><path> with probes.command, since the kubelet cannot reach loopback.
*/}}
{{- define "its-aggregator.probe" -}}
{{- $root := index . 0 -}}
{{- $p := index . 1 -}}
{{- if include "its-aggregator.tls" $root -}}
httpGet:
  path: {{ $p.path }}
  port: https
  scheme: HTTPS
{{- else -}}
exec:
  command:
{{- range $root.Values.probes.command }}
    - {{ . | quote }}
{{- end }}
    - {{ printf "http://127.0.0.1:%d%s" (int $root.Values.http.port) $p.path | quote }}
{{- end }}
{{- with omit $p "enabled" "path" }}
{{ toYaml . }}
{{- end }}
{{- end }}
