terraform {
  # The lifecycle preconditions in main.tf need Terraform 1.2 or later.
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # Pinned to the 5.x major: aws_autoscaling_attachment's
      # lb_target_group_arn and the aws_vpc_security_group_*_rule resources
      # used here are the 5.x forms. Commit .terraform.lock.hcl to pin the
      # exact build.
      version = "~> 5.0"
    }
  }
}
