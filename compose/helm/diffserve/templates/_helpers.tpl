{{/* Names and labels. */}}
{{- define "diffserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "diffserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The name of one component's objects: <fullname>-<component>. */}}
{{- define "diffserve.component" -}}
{{- printf "%s-%s" (include "diffserve.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "diffserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "diffserve.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "diffserve.labels" -}}
{{ include "diffserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: diffserve
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "diffserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "diffserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Redis: the URL every service uses (no credentials in it). */}}
{{- define "diffserve.redisUrl" -}}
{{- if and .Values.redis.inChart.enabled .Values.hostNetwork -}}
{{- /* every pod in the host's network namespace (make chart-smoke): Redis is on loopback */ -}}
{{- printf "redis://127.0.0.1:%d/0" (int .Values.redis.inChart.port) -}}
{{- else if .Values.redis.inChart.enabled -}}
{{- printf "redis://%s:%d/0" (include "diffserve.component" (dict "root" . "component" "redis")) (int .Values.redis.inChart.port) -}}
{{- else -}}
{{- required "redis.url is required (or set redis.inChart.enabled=true)" .Values.redis.url -}}
{{- end -}}
{{- end -}}

{{/* The Redis environment of one service (.user: its key in redis.acl.users). */}}
{{- define "diffserve.redisEnv" -}}
{{- $redis := .root.Values.redis -}}
- name: REDIS_URL
  value: {{ include "diffserve.redisUrl" .root | quote }}
{{- if $redis.acl.enabled }}
{{- $user := required (printf "redis.acl.users.%s is required" .user) (index $redis.acl.users .user) }}
- name: REDIS_USERNAME
  value: {{ $user | quote }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ required "redis.existingSecret is required with redis.acl.enabled" $redis.existingSecret }}
      key: {{ printf "%s-password" $user }}
{{- else if $redis.existingSecret }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $redis.existingSecret }}
      key: {{ $redis.passwordKey }}
{{- end }}
{{- if $redis.tls.existingSecret }}
- name: REDIS_TLS_CA
  value: /etc/diffserve/redis-tls/ca.crt
{{- if $redis.tls.clientCertificate }}
- name: REDIS_TLS_CERT
  value: /etc/diffserve/redis-tls/tls.crt
- name: REDIS_TLS_KEY
  value: /etc/diffserve/redis-tls/tls.key
{{- end }}
{{- end }}
{{- end -}}

{{/* Pod annotations: Prometheus scraping and a roll on settings changes. */}}
{{- define "diffserve.podAnnotations" -}}
checksum/settings: {{ include (print .root.Template.BasePath "/configmap.yaml") .root | sha256sum }}
{{- if .root.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- with .extra }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The image of a service: "control" or "models". */}}
{{- define "diffserve.image" -}}
{{- $image := index .root.Values.image .kind -}}
image: {{ printf "%s:%s" $image.repository $image.tag | quote }}
imagePullPolicy: {{ $image.pullPolicy }}
{{- end -}}

{{/* Liveness/readiness (and startup) probes: `diffserve healthcheck` on the service's metrics port. */}}
{{- define "diffserve.probes" -}}
{{- $check := list "diffserve" "healthcheck" "--quiet" "--port" (toString .port) -}}
startupProbe:
  exec:
    command: {{ toJson $check }}
  periodSeconds: {{ .startup.periodSeconds | default 5 }}
  timeoutSeconds: 5
  failureThreshold: {{ .startup.failureThreshold | default 60 }}
readinessProbe:
  exec:
    command: {{ toJson $check }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
livenessProbe:
  exec:
    command: {{ toJson $check }}
  periodSeconds: 15
  timeoutSeconds: 5
  failureThreshold: 4
{{- end -}}

{{/* The pod-level fields every DiffServe pod shares. */}}
{{- define "diffserve.podCommon" -}}
serviceAccountName: {{ include "diffserve.serviceAccountName" .root }}
automountServiceAccountToken: false
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
{{- if .root.Values.hostNetwork }}
hostNetwork: true
dnsPolicy: ClusterFirstWithHostNet
{{- end }}
{{- $nodeSelector := .values.nodeSelector | default dict -}}
{{- $tolerations := .values.tolerations | default list -}}
{{- if .gpu }}
{{- $nodeSelector = merge (deepCopy $nodeSelector) .root.Values.gpu.nodeSelector }}
{{- $tolerations = concat .root.Values.gpu.tolerations $tolerations }}
{{- end }}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Environment and volume mounts for the Redis TLS secret. */}}
{{- define "diffserve.tlsVolumeMount" -}}
{{- if .Values.redis.tls.existingSecret }}
- name: redis-tls
  mountPath: /etc/diffserve/redis-tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "diffserve.tlsVolume" -}}
{{- if .Values.redis.tls.existingSecret }}
- name: redis-tls
  secret:
    secretName: {{ .Values.redis.tls.existingSecret }}
{{- end }}
{{- end -}}

{{/* The env every service container starts with: its instance id (the pod name), metrics port and address. */}}
{{- define "diffserve.serviceEnv" -}}
- name: DIFFSERVE_INSTANCE_ID
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: METRICS_PORT
  value: {{ .port | quote }}
{{- if .root.Values.hostNetwork }}
- name: METRICS_ADDR
  value: "127.0.0.1"
{{- end }}
{{ include "diffserve.redisEnv" (dict "root" .root "user" .user) }}
{{- end -}}

{{/* The Service that exposes one component's metrics port (Prometheus, KEDA). */}}
{{- define "diffserve.metricsService" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "diffserve.component" . }}
  labels:
    {{- include "diffserve.labels" . | nindent 4 }}
spec:
  {{- if .headless }}
  clusterIP: None
  {{- end }}
  selector:
    {{- include "diffserve.selectorLabels" . | nindent 4 }}
  ports:
    - name: metrics
      port: {{ .port }}
      targetPort: metrics
  {{- range .extraPorts }}
    - name: {{ .name }}
      port: {{ .port }}
      targetPort: {{ .targetPort }}
  {{- end }}
{{- end -}}

{{/* One DiffServe service container.  Params: root, component, values, args, image (control|models),
     user (its key in redis.acl.users), port (metrics), gpu (count), env (extra EnvVars), ports, mounts, startup. */}}
{{- define "diffserve.container" -}}
- name: {{ .component }}
  {{- include "diffserve.image" (dict "root" .root "kind" .image) | nindent 2 }}
  args: {{ toJson .args }}
  envFrom:
    - configMapRef:
        name: {{ include "diffserve.component" (dict "root" .root "component" "settings") }}
  env:
    {{- include "diffserve.serviceEnv" (dict "root" .root "port" .port "user" .user) | nindent 4 }}
    {{- with .env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- with .values.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: metrics
      containerPort: {{ .port }}
    {{- with .ports }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- include "diffserve.probes" (dict "port" .port "startup" (.startup | default dict)) | nindent 2 }}
  {{- $resources := deepCopy (.values.resources | default dict) }}
  {{- if .gpu }}
  {{- $limits := merge (dict .root.Values.gpu.resourceName (int .gpu)) ($resources.limits | default dict) }}
  {{- $_ := set $resources "limits" $limits }}
  {{- end }}
  {{- with $resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml .root.Values.securityContext | nindent 4 }}
  {{- $mounts := concat (.mounts | default list) (include "diffserve.tlsVolumeMount" .root | fromYamlArray) }}
  {{- with $mounts }}
  volumeMounts:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* A Deployment of one DiffServe service.  Params: those of diffserve.container, plus replicas,
     strategy, volumes. */}}
{{- define "diffserve.deployment" -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "diffserve.component" . }}
  labels:
    {{- include "diffserve.labels" . | nindent 4 }}
spec:
  replicas: {{ .replicas }}
  {{- with .strategy }}
  strategy:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "diffserve.selectorLabels" . | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "diffserve.labels" . | nindent 8 }}
      annotations:
        {{- include "diffserve.podAnnotations" (dict "root" .root "port" .port "extra" .values.podAnnotations) | nindent 8 }}
    spec:
      {{- include "diffserve.podCommon" . | nindent 6 }}
      containers:
        {{- include "diffserve.container" . | nindent 8 }}
      {{- $volumes := concat (.volumes | default list) (include "diffserve.tlsVolume" .root | fromYamlArray) }}
      {{- with $volumes }}
      volumes:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}
