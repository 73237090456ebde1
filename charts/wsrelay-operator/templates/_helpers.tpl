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

{{/* The webhook's Service; the serving certificate is for <this>.<namespace>.svc too. */}}
{{- define "wsrelay-operator.webhookService" -}}
{{- printf "%s-webhook" (include "wsrelay-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The Secret holding the serving certificate (tls.crt, tls.key) of both HTTPS listeners. */}}
{{- define "wsrelay-operator.servingSecret" -}}
{{- if .Values.servingCertificate.existingSecret.name }}
{{- .Values.servingCertificate.existingSecret.name }}
{{- else }}
{{- printf "%s-serving-tls" (include "wsrelay-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* The cert-manager Certificate (cert-manager.io/inject-ca-from names it). */}}
{{- define "wsrelay-operator.servingCertificate" -}}
{{- printf "%s-serving" (include "wsrelay-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Whether an HTTPS listener (metrics API, webhook) is served: they need the certificate. */}}
{{- define "wsrelay-operator.https" -}}
{{- if or .Values.metricsApi.enabled .Values.webhook.enabled }}true{{ end }}
{{- end }}

{{/* The names the serving certificate is for, as a YAML list: each served listener's
Service as <svc>.<namespace>.svc (what the API server checks), <svc>.<namespace>, <svc>. */}}
{{- define "wsrelay-operator.servingDnsNames" -}}
{{- $names := list }}
{{- if .Values.metricsApi.enabled }}
{{- $svc := include "wsrelay-operator.metricsApiService" . }}
{{- $names = concat $names (list (printf "%s.%s.svc" $svc .Release.Namespace) (printf "%s.%s" $svc .Release.Namespace) $svc) }}
{{- end }}
{{- if .Values.webhook.enabled }}
{{- $svc := include "wsrelay-operator.webhookService" . }}
{{- $names = concat $names (list (printf "%s.%s.svc" $svc .Release.Namespace) (printf "%s.%s" $svc .Release.Namespace) $svc) }}
{{- end }}
{{- toYaml $names }}
{{- end }}

{{/* The serving certificate as YAML {caBundle, tlsCrt, tlsKey} (base64), the same in every
template of one render: the Secret, the APIServices' and the webhook's caBundle must match,
and genCA makes a new CA each call, so the first call stores its result for the others.
Generated source: the Secret already in the cluster is reused when it was made for the same
names (an upgrade keeps the certificate and the caBundle); a new CA and certificate
otherwise (first install, a listener turned on or off, or `helm template`, where lookup
finds nothing). Your own Secret: caBundle only. cert-manager: nothing (its cainjector). */}}
{{- define "wsrelay-operator.servingTls" -}}
{{- if not (hasKey .Values "wsrelayServingTls") }}
{{- $tls := dict "caBundle" "" "tlsCrt" "" "tlsKey" "" }}
{{- $c := .Values.servingCertificate }}
{{- if and $c.certManager.enabled $c.existingSecret.name }}
{{- fail "servingCertificate.certManager.enabled and servingCertificate.existingSecret.name exclude each other" }}
{{- end }}
{{- if $c.existingSecret.name }}
{{- $_ := set $tls "caBundle" (required "servingCertificate.existingSecret.caBundle (base64 PEM CA) is required with servingCertificate.existingSecret.name" $c.existingSecret.caBundle) }}
{{- else if not $c.certManager.enabled }}
{{- $names := include "wsrelay-operator.servingDnsNames" . | fromYamlArray }}
{{- $old := lookup "v1" "Secret" .Release.Namespace (include "wsrelay-operator.servingSecret" .) }}
{{- $oldNames := "" }}
{{- if and $old $old.metadata $old.metadata.annotations }}
{{- $oldNames = index $old.metadata.annotations "wsrelay.dev/dns-names" | default "" }}
{{- end }}
{{- if and $old $old.data (index $old.data "ca.crt") (index $old.data "tls.crt") (index $old.data "tls.key") (eq $oldNames (join "," $names)) }}
{{- $_ := set $tls "caBundle" (index $old.data "ca.crt") }}
{{- $_ := set $tls "tlsCrt" (index $old.data "tls.crt") }}
{{- $_ := set $tls "tlsKey" (index $old.data "tls.key") }}
{{- else }}
{{- $days := int $c.validityDays }}
{{- $ca := genCA (printf "%s-serving-ca" (include "wsrelay-operator.fullname" .)) $days }}
{{- $cert := genSignedCert (first $names) nil $names $days $ca }}
{{- $_ := set $tls "caBundle" ($ca.Cert | b64enc) }}
{{- $_ := set $tls "tlsCrt" ($cert.Cert | b64enc) }}
{{- $_ := set $tls "tlsKey" ($cert.Key | b64enc) }}
{{- end }}
{{- end }}
{{- $_ := set .Values "wsrelayServingTls" $tls }}
{{- end }}
{{- toYaml .Values.wsrelayServingTls }}
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
