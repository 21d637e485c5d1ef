# The ALB accepts 80 and 443 from ingress_cidr_blocks and may open
# connections only to the nodes' 30080 (proxy) and 30081 (health checks).
# The nodes accept 30080 and 30081 from the ALB's security group only.
#
# Terraform removes the default allow-all egress rule from a security group
# it creates, so the ALB's egress is exactly the two rules below.

resource "aws_security_group" "alb" {
  name        = "${var.name}-alb"
  description = "monedge ALB: HTTP and HTTPS in; out only to the worker nodes on 30080 and 30081"
  vpc_id      = var.vpc_id
}

resource "aws_vpc_security_group_ingress_rule" "alb_https" {
  for_each = toset(var.ingress_cidr_blocks)

  security_group_id = aws_security_group.alb.id
  description       = "HTTPS from clients"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_ingress_rule" "alb_http" {
  for_each = toset(var.ingress_cidr_blocks)

  security_group_id = aws_security_group.alb.id
  description       = "HTTP from clients (redirected to HTTPS)"
  ip_protocol       = "tcp"
  from_port         = 80
  to_port           = 80
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_egress_rule" "alb_to_nodes_proxy" {
  security_group_id            = aws_security_group.alb.id
  description                  = "Requests to monedge on the nodes"
  ip_protocol                  = "tcp"
  from_port                    = 30080
  to_port                      = 30080
  referenced_security_group_id = var.node_security_group_id
}

resource "aws_vpc_security_group_egress_rule" "alb_to_nodes_admin" {
  security_group_id            = aws_security_group.alb.id
  description                  = "Health checks to monedge's /readyz on the nodes"
  ip_protocol                  = "tcp"
  from_port                    = 30081
  to_port                      = 30081
  referenced_security_group_id = var.node_security_group_id
}

resource "aws_vpc_security_group_ingress_rule" "nodes_proxy_from_alb" {
  security_group_id            = var.node_security_group_id
  description                  = "monedge proxy (NodePort 30080) from the ALB"
  ip_protocol                  = "tcp"
  from_port                    = 30080
  to_port                      = 30080
  referenced_security_group_id = aws_security_group.alb.id
}

resource "aws_vpc_security_group_ingress_rule" "nodes_admin_from_alb" {
  security_group_id            = var.node_security_group_id
  description                  = "monedge admin /readyz (NodePort 30081) from the ALB's health checks"
  ip_protocol                  = "tcp"
  from_port                    = 30081
  to_port                      = 30081
  referenced_security_group_id = aws_security_group.alb.id
}
