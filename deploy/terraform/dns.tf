# Optional: alias records for the host names clients use, when the zone is
# in Route 53. Leave route53_zone_id empty to manage DNS elsewhere (a CNAME
# to the alb_dns_name output).
resource "aws_route53_record" "edge" {
  for_each = var.route53_zone_id == "" ? toset([]) : toset(var.dns_names)

  zone_id = var.route53_zone_id
  name    = each.value
  type    = "A"

  alias {
    name                   = aws_lb.edge.dns_name
    zone_id                = aws_lb.edge.zone_id
    evaluate_target_health = true
  }
}
