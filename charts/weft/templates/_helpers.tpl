{{/* The name prefix of every object: the release name unless overridden. */}}
{{- define "weft.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{/* The operator's name: its Deployment, Service, ServiceAccount and Roles. */}}
{{- define "weft.operator" -}}
{{- printf "%s-operator" (include "weft.fullname" .) -}}
{{- end -}}

{{- define "weft.serviceAccount" -}}
{{- default (include "weft.operator" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* The MutatingWebhookConfiguration's name (cluster-wide). */}}
{{- define "weft.webhook" -}}
{{- printf "%s-injector" (include "weft.fullname" .) -}}
{{- end -}}

{{- define "weft.labels" -}}
app.kubernetes.io/name: weft
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: weft
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "weft.selector" -}}
app.kubernetes.io/name: weft
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "weft.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) -}}
{{- end -}}

{{- define "weft.proxyImage" -}}
{{- printf "%s:%s" .Values.proxy.image.repository (default .Chart.AppVersion .Values.proxy.image.tag) -}}
{{- end -}}

{{/* Namespaces never injected: kube-system, the release namespace, then the user's. */}}
{{- define "weft.excludedNamespaces" -}}
{{- $all := list "kube-system" .Release.Namespace -}}
{{- range .Values.proxy.excludedNamespaces -}}
{{- if not (has . $all) -}}{{- $all = append $all . -}}{{- end -}}
{{- end -}}
{{- join "," $all -}}
{{- end -}}
