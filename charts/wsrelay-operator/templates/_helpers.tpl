{{/* Chart name, for the app.kubernetes.io/name label. */}}
{{- define "wsrelay-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every object name: the release name, plus the chart name unless it already has it. */}}
{{- define "wsrelay-operator.fullname" -}}
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

{{- define "wsrelay-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The labels that select the operator pods: stable across upgrades. */}}
{{- define "wsrelay-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wsrelay-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "wsrelay-operator.labels" -}}
helm.sh/chart: {{ include "wsrelay-operator.chart" . }}
{{ include "wsrelay-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: wsrelay
{{- end }}

{{- define "wsrelay-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "wsrelay-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The metrics API's Service; the serving certificate is for <this>.<namespace>.svc. */}}
{{- define "wsrelay-operator.metricsApiService" -}}
{{- printf "%s-metrics-api" (include "wsrelay-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The Secret holding the serving certificate (tls.crt, tls.key). */}}
{{- define "wsrelay-operator.metricsApiSecret" -}}
{{- if .Values.metricsApi.existingSecret.name }}
{{- .Values.metricsApi.existingSecret.name }}
{{- else }}
{{- printf "%s-metrics-api-tls" (include "wsrelay-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "wsrelay-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The NetworkPolicy peers allowed to reach the relays' admin port, as JSON: the operator's
own pods (by namespace name and selector labels) and relayAdminAccess.from. */}}
{{- define "wsrelay-operator.relayAdminPeers" -}}
{{- $operator := dict
      "namespaceSelector" (dict "matchLabels" (dict "kubernetes.io/metadata.name" .Release.Namespace))
      "podSelector" (dict "matchLabels" (include "wsrelay-operator.selectorLabels" . | fromYaml)) -}}
{{- prepend .Values.relayAdminAccess.from $operator | toJson -}}
{{- end }}
