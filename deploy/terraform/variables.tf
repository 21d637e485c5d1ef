variable "region" {
  description = "AWS region of the VPC, the worker nodes and the ALB, e.g. eu-west-1."
  type        = string
}

variable "name" {
  description = "Name of the ALB; also the prefix of the target group (NAME-nodes) and the ALB security group (NAME-alb). Letters, digits and hyphens, at most 26 characters, so that NAME-nodes fits the 32-character limit on target group names."
  type        = string
  default     = "monedge"

  validation {
    condition     = can(regex("^[a-zA-Z0-9]([a-zA-Z0-9-]{0,24}[a-zA-Z0-9])?$", var.name))
    error_message = "name must be 1 to 26 letters, digits or hyphens, not starting or ending with a hyphen."
  }
}

variable "vpc_id" {
  description = "ID of the VPC the worker nodes run in."
  type        = string
}

variable "public_subnet_ids" {
  description = "Public subnets for the internet-facing ALB (routed to an internet gateway), in at least two Availability Zones."
  type        = list(string)

  validation {
    condition     = length(var.public_subnet_ids) >= 2
    error_message = "An ALB needs subnets in at least two Availability Zones."
  }
}

variable "certificate_arn" {
  description = "ARN of the ACM certificate for the HTTPS listener: it must cover every host name clients use (e.g. api.example.com)."
  type        = string
}

variable "additional_certificate_arns" {
  description = "ARNs of further ACM certificates for the HTTPS listener, chosen by SNI (for host names the main certificate does not cover)."
  type        = list(string)
  default     = []
}

variable "ssl_policy" {
  description = "TLS security policy of the HTTPS listener. The default allows TLS 1.3 and 1.2 with forward-secret ciphers only."
  type        = string
  default     = "ELBSecurityPolicy-TLS13-1-2-2021-06"
}

variable "ingress_cidr_blocks" {
  description = "IPv4 ranges allowed to reach the ALB on ports 80 and 443. The default is the whole internet."
  type        = list(string)
  default     = ["0.0.0.0/0"]

  validation {
    condition     = alltrue([for cidr in var.ingress_cidr_blocks : can(cidrnetmask(cidr))])
    error_message = "Each entry must be an IPv4 CIDR block, such as 0.0.0.0/0 or 203.0.113.0/24."
  }
}

variable "node_autoscaling_group_names" {
  description = "Names of the autoscaling groups of the Kubernetes worker nodes. Every instance in them is registered in the target group on port 30080 (for EKS managed node groups: aws_eks_node_group.NAME.resources[0].autoscaling_groups[0].name)."
  type        = list(string)

  validation {
    condition     = length(var.node_autoscaling_group_names) >= 1
    error_message = "At least one autoscaling group is needed."
  }
}

variable "node_security_group_id" {
  description = "ID of the security group attached to the worker nodes. Rules are added to it that allow ports 30080 and 30081 from the ALB's security group only."
  type        = string
}

variable "idle_timeout" {
  description = "ALB idle timeout, in seconds: a connection (client or node side) with no bytes either way for this long is closed. Must be below monedge's --keepalive-timeout (monedge_keepalive_timeout) and above the per-service policy timeout and idle-timeout (60 s by default)."
  type        = number
  default     = 65
}

variable "monedge_keepalive_timeout" {
  description = "monedge's --keepalive-timeout in seconds, as set in the monedge-flags ConfigMap (MONEDGE_KEEPALIVE_TIMEOUT). Used only to check that idle_timeout is below it."
  type        = number
  default     = 75
}

variable "monedge_drain_delay" {
  description = "monedge's --drain-delay in seconds, as set in the monedge-flags ConfigMap (MONEDGE_DRAIN_DELAY). Used only to check that the health check notices a draining target within it."
  type        = number
  default     = 15
}

variable "monedge_drain_timeout" {
  description = "monedge's --drain-timeout in seconds, as set in the monedge-flags ConfigMap (MONEDGE_DRAIN_TIMEOUT). Used only to check that the deregistration delay is at least as long."
  type        = number
  default     = 25
}

variable "deletion_protection" {
  description = "Whether the ALB is protected from deletion (set false before terraform destroy)."
  type        = bool
  default     = true
}

variable "route53_zone_id" {
  description = "ID of a Route 53 hosted zone in which to create alias records for dns_names. Empty: no records are created; point your DNS at the alb_dns_name output yourself."
  type        = string
  default     = ""
}

variable "dns_names" {
  description = "Host names (e.g. api.example.com) to point at the ALB with Route 53 alias records in route53_zone_id."
  type        = list(string)
  default     = []
}

variable "tags" {
  description = "Tags applied to every resource this configuration creates."
  type        = map(string)
  default     = {}
}
