{{/* Names and labels shared by every object of the chart. */}}

{{- define "nilai.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's base name: "<release>-nilai", or the release name alone when it says nilai. */}}
{{- define "nilai.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "nilai.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nilai.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "nilai.labels" -}}
{{ include "nilai.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "nilai.gateway.fullname" -}}
{{- printf "%s-gateway" (include "nilai.fullname" .) -}}
{{- end -}}

{{/* Pods of the gateway: the NetworkPolicy lets only these reach the model servers. */}}
{{- define "nilai.gateway.selectorLabels" -}}
{{ include "nilai.selectorLabels" . }}
app.kubernetes.io/component: gateway
{{- end -}}

{{- define "nilai.modelServer.selectorLabels" -}}
{{ include "nilai.selectorLabels" . }}
app.kubernetes.io/component: model-server
{{- end -}}

{{- define "nilai.secretName" -}}
{{- default (printf "%s-secrets" (include "nilai.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "nilai.gateway.image" -}}
{{- $image := .Values.gateway.image -}}
{{- printf "%s:%s" $image.repository (default .Chart.AppVersion $image.tag) -}}
{{- end -}}

{{/*
How long Kubernetes waits between deleting a gateway pod and killing it: the preStop sleep,
then the gateway's own drain (NILAI_SHUTDOWN_GRACE_S, rounded up as uvicorn rounds it), then the
query-log flush and clean-up. Derived from the same values the gateway's environment gets, so
the two cannot disagree.
*/}}
{{- define "nilai.gateway.terminationGracePeriodSeconds" -}}
{{- $drain := .Values.gateway.drain -}}
{{- add $drain.preStopSleepSeconds (ceil $drain.shutdownGraceSeconds) $drain.flushSeconds -}}
{{- end -}}

{{/* The Redis URL for the containers, from the Secret. */}}
{{- define "nilai.env.redisUrl" -}}
- name: NILAI_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "nilai.secretName" . }}
      key: redis-url
{{- end -}}

{{/* Values the schema cannot check alone: fail at render time with a clear message. */}}
{{- define "nilai.validate" -}}
{{- $scaling := .Values.gateway.autoscaling -}}
{{- if and $scaling.enabled (gt (int $scaling.minReplicas) (int $scaling.maxReplicas)) -}}
{{- fail (printf "gateway.autoscaling.minReplicas (%v) must not exceed maxReplicas (%v)" $scaling.minReplicas $scaling.maxReplicas) -}}
{{- end -}}
{{- $seen := dict -}}
{{- range $index, $model := .Values.models -}}
{{- if hasKey $seen $model.name -}}
{{- fail (printf "models[%d].name %q is used twice: each model server needs its own name" $index $model.name) -}}
{{- end -}}
{{- $_ := set $seen $model.name true -}}
{{- if ne (mod (int $model.gpus) (int $model.tensorParallelSize)) 0 -}}
{{- fail (printf "models[%d] (%s): gpus (%v) must be a multiple of tensorParallelSize (%v)" $index $model.name $model.gpus $model.tensorParallelSize) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.ingress.enabled .Values.ingress.tls.enabled (not .Values.ingress.certManager.clusterIssuer) (not .Values.ingress.tls.secretName) -}}
{{- fail "ingress.tls needs a certManager.clusterIssuer or an existing tls.secretName" -}}
{{- end -}}
{{- end -}}
