# The AWS edge in front of monedge, managed outside Kubernetes: an
# internet-facing ALB terminates TLS and sends every request to NodePort
# 30080 on every worker node, where monedge routes it by naming convention.
# Kubernetes owns only the NodePort Service (deploy/kubernetes/service.yaml);
# there is no Ingress and no load-balancer controller.

provider "aws" {
  region = var.region

  default_tags {
    tags = var.tags
  }
}

locals {
  # ALB health check timing, lined up with monedge's drain. A target whose
  # checks start failing is taken out after unhealthy_threshold failures,
  # interval seconds apart, each waiting up to timeout: within
  # 5 * 2 + 4 = 14 s, below monedge's --drain-delay (15 s), during which a
  # draining monedge still serves everything it is sent.
  #
  # With externalTrafficPolicy: Cluster (deploy/kubernetes/service.yaml), a
  # node's check reaches any ready monedge pod, so it fails only when the
  # node cannot reach one; kube-proxy, not the ALB, takes a draining pod out
  # of rotation. The 14 s bound keeps the drain correct with Local too,
  # where the ALB's check is what stops traffic to a node. A threshold of 2
  # rather than 1 means one unlucky check (one that reaches a pod in the
  # second before kube-proxy drops it) does not take a node out.
  health_check_interval            = 5
  health_check_timeout             = 4
  health_check_healthy_threshold   = 2
  health_check_unhealthy_threshold = 2
  health_check_notice_seconds      = local.health_check_interval * local.health_check_unhealthy_threshold + local.health_check_timeout

  # How long the ALB lets requests in flight finish on a node that leaves
  # the target group (autoscaling scale-in, instance refresh) before closing
  # their connections: the same budget monedge gives requests in flight
  # when it drains (--drain-timeout, 25 s), plus 5 s. The autoscaling group
  # waits for it before terminating the instance.
  deregistration_delay = 30
}

resource "aws_lb" "edge" {
  name               = var.name
  load_balancer_type = "application"
  internal           = false
  ip_address_type    = "ipv4"
  subnets            = var.public_subnet_ids
  security_groups    = [aws_security_group.alb.id]

  # The ALB closes a connection, client side or node side, after this many
  # seconds with no bytes either way. Two rules set it:
  #
  # - It must be SHORTER than monedge's --keepalive-timeout (75 s). The ALB
  #   keeps idle connections to the nodes and reuses them. If monedge closed
  #   an idle one first, the ALB could send a request on it just as
  #   monedge's FIN arrives, and answer the client 502. With the ALB's
  #   timeout shorter, only the ALB ever closes an idle connection.
  # - It should be LONGER than the per-service policy `timeout` and
  #   `idle-timeout` (60 s by default), so that a slow upstream gets
  #   monedge's own 504 upstream_timeout (JSON body, request id, access-log
  #   line) rather than the ALB's bare 504.
  #
  # Hence 60 < 65 < 75.
  idle_timeout = var.idle_timeout

  # Refuse header names that are not [A-Za-z0-9-]+ (request smuggling
  # hardening; note that it drops headers with underscores).
  drop_invalid_header_fields = true
  # HTTP/2 with clients; the ALB speaks HTTP/1.1 to monedge (target group
  # protocol_version).
  enable_http2 = true
  # The ALB appends the client's address to X-Forwarded-For; monedge keeps
  # that one entry with --trusted-hops 1, from peers in the VPC's range only
  # (--trusted-proxies, output monedge_trusted_proxies).
  xff_header_processing_mode = "append"
  enable_deletion_protection = var.deletion_protection

  lifecycle {
    precondition {
      condition     = var.idle_timeout < var.monedge_keepalive_timeout
      error_message = "idle_timeout must be below monedge's --keepalive-timeout (monedge_keepalive_timeout), or the ALB can reuse a connection monedge is closing and answer 502."
    }
  }
}

# Every worker node on NodePort 30080. With externalTrafficPolicy: Cluster,
# any node forwards to a ready monedge pod, so every node is a valid target.
resource "aws_lb_target_group" "nodes" {
  name                 = "${var.name}-nodes"
  vpc_id               = var.vpc_id
  target_type          = "instance"
  protocol             = "HTTP"
  protocol_version     = "HTTP1"
  port                 = 30080
  deregistration_delay = local.deregistration_delay

  # monedge's admin listener, through NodePort 30081. /readyz is 200 only
  # when a monedge pod is started, synced and not draining.
  health_check {
    enabled             = true
    protocol            = "HTTP"
    port                = "30081"
    path                = "/readyz"
    matcher             = "200"
    interval            = local.health_check_interval
    timeout             = local.health_check_timeout
    healthy_threshold   = local.health_check_healthy_threshold
    unhealthy_threshold = local.health_check_unhealthy_threshold
  }

  lifecycle {
    precondition {
      condition     = local.health_check_notice_seconds < var.monedge_drain_delay
      error_message = "The health check takes longer to mark a target unhealthy than monedge's --drain-delay: the ALB would keep sending requests after monedge stops accepting."
    }
    precondition {
      condition     = local.deregistration_delay >= var.monedge_drain_timeout
      error_message = "deregistration_delay must be at least monedge's --drain-timeout."
    }
  }
}

# Registers every instance of the worker autoscaling groups, present and
# future, in the target group; the autoscaling group deregisters an
# instance (and waits for the deregistration delay) before terminating it.
resource "aws_autoscaling_attachment" "nodes" {
  for_each = toset(var.node_autoscaling_group_names)

  autoscaling_group_name = each.value
  lb_target_group_arn    = aws_lb_target_group.nodes.arn
}

resource "aws_lb_listener" "https" {
  load_balancer_arn = aws_lb.edge.arn
  port              = 443
  protocol          = "HTTPS"
  ssl_policy        = var.ssl_policy
  certificate_arn   = var.certificate_arn

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.nodes.arn
  }
}

resource "aws_lb_listener_certificate" "additional" {
  for_each = toset(var.additional_certificate_arns)

  listener_arn    = aws_lb_listener.https.arn
  certificate_arn = each.value
}

# Plain HTTP only redirects to HTTPS; no request reaches monedge over it.
resource "aws_lb_listener" "http" {
  load_balancer_arn = aws_lb.edge.arn
  port              = 80
  protocol          = "HTTP"

  default_action {
    type = "redirect"

    redirect {
      protocol    = "HTTPS"
      port        = "443"
      status_code = "HTTP_301"
    }
  }
}

# The VPC, for its CIDR block: the addresses monedge trusts to set
# X-Forwarded-For (--trusted-proxies; output monedge_trusted_proxies).
data "aws_vpc" "nodes" {
  id = var.vpc_id
}
