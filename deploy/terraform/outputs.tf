output "alb_dns_name" {
  description = "DNS name of the ALB: point the clients' host names at it (alias record, or CNAME outside Route 53)."
  value       = aws_lb.edge.dns_name
}

output "alb_zone_id" {
  description = "Route 53 hosted zone ID of the ALB, for alias records made outside this configuration."
  value       = aws_lb.edge.zone_id
}

output "alb_arn" {
  description = "ARN of the ALB."
  value       = aws_lb.edge.arn
}

output "alb_security_group_id" {
  description = "ID of the ALB's security group (the only source allowed to reach the nodes on 30080 and 30081)."
  value       = aws_security_group.alb.id
}

output "target_group_arn" {
  description = "ARN of the target group of worker nodes (port 30080, health check /readyz on 30081): check it with aws elbv2 describe-target-health."
  value       = aws_lb_target_group.nodes.arn
}

output "https_listener_arn" {
  description = "ARN of the HTTPS listener, for adding certificates or rules outside this configuration."
  value       = aws_lb_listener.https.arn
}

output "dns_records" {
  description = "Fully qualified names of the Route 53 alias records created (empty when route53_zone_id is empty)."
  value       = [for record in aws_route53_record.edge : record.fqdn]
}

output "monedge_trusted_proxies" {
  description = "The VPC's CIDR block: set MONEDGE_TRUSTED_PROXIES in deploy/kubernetes/configmap.yaml to it, so that monedge believes X-Forwarded-For only from the ALB and the nodes."
  value       = data.aws_vpc.nodes.cidr_block
}
