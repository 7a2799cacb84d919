{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "adapterdrop-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped name; the "-headless" suffix must still fit, hence 54. */}}
{{- define "adapterdrop-serve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "adapterdrop-serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Kubernetes recommended labels. */}}
{{- define "adapterdrop-serve.labels" -}}
helm.sh/chart: {{ include "adapterdrop-serve.chart" . }}
{{ include "adapterdrop-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ include "adapterdrop-serve.imageTag" . | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/component: server
app.kubernetes.io/part-of: adapterdrop
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Immutable (Deployment selector): name and instance only. */}}
{{- define "adapterdrop-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "adapterdrop-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "adapterdrop-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "adapterdrop-serve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "adapterdrop-serve.imageTag" -}}
{{- printf "%s%s" (default .Chart.AppVersion .Values.image.tag) .Values.image.tagSuffix }}
{{- end }}

{{- define "adapterdrop-serve.image" -}}
{{- printf "%s:%s" .Values.image.repository (include "adapterdrop-serve.imageTag" .) }}
{{- end }}

{{/* Image holding the bundled repository for the init container: the server image unless overridden. */}}
{{- define "adapterdrop-serve.repositoryImage" -}}
{{- $m := .Values.modelRepository.image }}
{{- if $m.repository }}
{{- printf "%s:%s" $m.repository (default (include "adapterdrop-serve.imageTag" .) $m.tag) }}
{{- else }}
{{- include "adapterdrop-serve.image" . }}
{{- end }}
{{- end }}

{{- define "adapterdrop-serve.pvcName" -}}
{{- default (printf "%s-models" (include "adapterdrop-serve.fullname" .)) .Values.modelRepository.pvc.existingClaim }}
{{- end }}

{{- define "adapterdrop-serve.clientCASecretName" -}}
{{- default .Values.tls.secretName .Values.tls.clientCASecretName }}
{{- end }}

{{/*
The effective server configuration: .Values.config plus the keys the chart derives from other values.
Returned as YAML (fromYaml turns it back into a dict).
*/}}
{{- define "adapterdrop-serve.settings" -}}
{{- $cfg := deepCopy (default dict .Values.config) }}
{{- range $key := list "server.listen" "metrics.listen" "admin.listen" "repository.path" "tls.cert_path" "tls.key_path" "tls.client_ca_path" }}
{{- $parts := splitList "." $key }}
{{- $section := get $cfg (first $parts) }}
{{- if and (kindIs "map" $section) (hasKey $section (last $parts)) }}
{{- fail (printf "config.%s is set by the chart (see values.yaml); remove it from config" $key) }}
{{- end }}
{{- end }}
{{- $_ := set $cfg "server" (merge (dict "listen" (printf "0.0.0.0:%d" (int .Values.ports.grpc))) (default dict $cfg.server)) }}
{{- $_ = set $cfg "metrics" (merge (dict "listen" (ternary (printf "0.0.0.0:%d" (int .Values.ports.metrics)) "" .Values.metrics.enabled)) (default dict $cfg.metrics)) }}
{{- $_ = set $cfg "admin" (merge (dict "listen" (ternary (printf "0.0.0.0:%d" (int .Values.ports.admin)) "" .Values.admin.enabled)) (default dict $cfg.admin)) }}
{{- $_ = set $cfg "repository" (merge (dict "path" .Values.modelRepository.mountPath) (default dict $cfg.repository)) }}
{{- if .Values.tls.enabled }}
{{- if not .Values.tls.secretName }}
{{- fail "tls.enabled needs tls.secretName (a kubernetes.io/tls Secret)" }}
{{- end }}
{{- $tls := dict "cert_path" (printf "%s/tls.crt" .Values.tls.mountPath) "key_path" (printf "%s/tls.key" .Values.tls.mountPath) }}
{{- if .Values.tls.clientCA }}
{{- $_ = set $tls "client_ca_path" (printf "%s/%s" .Values.tls.clientCAMountPath .Values.tls.clientCASecretKey) }}
{{- end }}
{{- $_ = set $cfg "tls" (merge $tls (default dict $cfg.tls)) }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* One TOML value: strings as JSON strings (a subset of TOML basic strings), integral numbers without ".0". */}}
{{- define "adapterdrop-serve.tomlValue" -}}
{{- if kindIs "string" . }}{{ toJson . }}
{{- else if kindIs "bool" . }}{{ . }}
{{- else if or (kindIs "float64" .) (kindIs "int64" .) (kindIs "int" .) }}
{{- if eq (float64 (int64 .)) (float64 .) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else }}{{ fail (printf "config values must be strings, numbers or booleans, got %v" .) }}
{{- end }}
{{- end }}

{{/* The configuration file: one [section] per map, keys sorted, null keys left out. */}}
{{- define "adapterdrop-serve.configToml" -}}
{{- $cfg := include "adapterdrop-serve.settings" . | fromYaml }}
{{- range $section, $keys := $cfg }}
{{- if not (kindIs "map" $keys) }}
{{- fail (printf "config.%s must be a section (a map of keys)" $section) }}
{{- end }}
[{{ $section }}]
{{- range $key, $value := $keys }}
{{- if not (kindIs "invalid" $value) }}
{{ $key }} = {{ include "adapterdrop-serve.tomlValue" $value }}
{{- end }}
{{- end }}
{{ end }}
{{- end }}

{{/* Seconds the kubelet waits after SIGTERM: always longer than the server's own drain timer. */}}
{{- define "adapterdrop-serve.terminationGrace" -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- $grace := 30 }}
{{- if and .Values.config.server (hasKey .Values.config.server "shutdown_grace_s") (not (kindIs "invalid" .Values.config.server.shutdown_grace_s)) }}
{{- $grace = int .Values.config.server.shutdown_grace_s }}
{{- end }}
{{- add $grace (int .Values.preStopSleepSeconds) 10 }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* Non-empty when the chart creates the admin-token Secret itself (admin port on, no auth.existingSecret). */}}
{{- define "adapterdrop-serve.generatesAdminToken" -}}
{{- if and .Values.admin.enabled (not .Values.auth.existingSecret) .Values.auth.generateAdminToken }}true{{ end }}
{{- end }}

{{- define "adapterdrop-serve.adminTokenSecretName" -}}
{{- if include "adapterdrop-serve.generatesAdminToken" . }}
{{- printf "%s-admin-token" (include "adapterdrop-serve.fullname" .) }}
{{- else }}
{{- .Values.auth.existingSecret }}
{{- end }}
{{- end }}

{{- define "adapterdrop-serve.adminTokenSecretKey" -}}
{{- default "admin-token" .Values.auth.adminTokenKey }}
{{- end }}
